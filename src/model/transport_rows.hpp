#pragma once
// Internal to the LibTorch part: the transport table, printed and as JSON, shared by the
// classifiers' and the decoders' transport.

#include <nlohmann/json.hpp>
#include <ostream>
#include <vector>

#include "gradfix/model/jobs.hpp"

namespace gradfix {

// `metric` heads the accuracy column ("test acc", "test tok acc").
void print_transport_rows(const std::vector<TransportRow>& rows, std::ostream& log, const char* metric = "test acc");
nlohmann::json transport_rows_json(const std::vector<TransportRow>& rows);

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
