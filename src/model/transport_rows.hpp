#pragma once
// Internal to the LibTorch part: the transport table, printed and as JSON, shared by the
// classifiers' and the decoders' transport.

#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "gradfix/model/jobs.hpp"

namespace gradfix {

// `metric` heads the accuracy column ("test acc", "test tok acc").
void print_transport_rows(const std::vector<TransportRow>& rows, std::ostream& log, const char* metric = "test acc");
nlohmann::json transport_rows_json(const std::vector<TransportRow>& rows);
// results.json's summary of the first-order check: the GradFix row's <g, d> as
// "directional_derivative" and the naive row's as "naive_directional_derivative".
void add_derivative_summary(const std::vector<TransportRow>& rows, nlohmann::json& results);
// <g, d> as a table cell: scientific notation, or "-" where the row has none.
std::string derivative_cell(double derivative);
// A sample count as a table cell: "4800", "250.0k", "1.2M", or "-" where it is not known.
std::string samples_cell(long long samples);

// A row of the table; the directional derivative and the alpha curve are set after, where they exist.
inline TransportRow make_transport_row(const std::string& method, double accuracy, double loss, double alpha, double kept, double agreement) {
  TransportRow row;
  row.method = method;
  row.accuracy = accuracy;
  row.loss = loss;
  row.alpha = alpha;
  row.kept = kept;
  row.sign_agreement = agreement;
  return row;
}

// The samples a transport passes through the network, its progress total: the statistics on the
// shots (a second pass for the mean gradient in max mode), the zero-shot test, each row whose
// alpha is searched (naive, GradFix, and the oracle with tau_B: the grid on the support set and
// the shots, then the test), few-shot fine-tuning (every step on the shots, every step count
// scored on the support set, per learning rate, then the test; once from B and, with
// `finetune_starts` 2, again from GradFix's model) and the upper bound's test.
inline long long transport_sample_passes(SignMode sign_mode, long long shots, long long support, long long test, std::size_t alphas,
                                         bool oracle, std::size_t finetune_lrs, const std::vector<long long>& finetune_steps,
                                         bool upper_bound, int finetune_starts) {
  long long total = shots * (sign_mode == SignMode::kMax ? 2 : 1) + test;
  total += (oracle ? 3 : 2) * (static_cast<long long>(alphas) * (support + shots) + test);
  if (finetune_lrs > 0) {
    const long long steps = finetune_steps.empty() ? 0 : finetune_steps.back();
    total += finetune_starts * (static_cast<long long>(finetune_lrs) * (steps * shots + static_cast<long long>(finetune_steps.size()) * support) + test);
  }
  return total + (upper_bound ? test : 0);
}

}  // namespace gradfix
