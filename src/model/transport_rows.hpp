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

}  // namespace gradfix
