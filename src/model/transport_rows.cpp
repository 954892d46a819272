// The transport table, printed and as JSON (transport_rows.hpp).
#include "transport_rows.hpp"

#include <cmath>
#include <iomanip>
#include <sstream>

namespace gradfix {

void print_transport_rows(const std::vector<TransportRow>& rows, std::ostream& log, const char* metric) {
  const int width = std::max(10, static_cast<int>(std::strlen(metric)) + 2);
  int label_width = 34;
  for (const auto& row : rows) label_width = std::max(label_width, static_cast<int>(row.method.size()) + 2);
  log << std::left << std::setw(label_width) << "method" << std::right << std::setw(width) << metric << std::setw(10) << "loss"
      << std::setw(8) << "alpha" << std::setw(8) << "kept" << std::setw(12) << "agree(B)" << std::setw(12) << "<g,d>" << std::setw(10)
      << "fwd" << std::setw(10) << "bwd" << "\n";
  for (const auto& row : rows) {
    auto cell = [](double value, int w, int precision, bool percent) {
      std::ostringstream text;
      if (value < 0) text << std::setw(w) << "-";
      else text << std::setw(w) << std::fixed << std::setprecision(precision) << (percent ? 100.0 * value : value) << (percent ? "%" : "");
      return text.str();
    };
    log << std::left << std::setw(label_width) << row.method << std::right << cell(row.accuracy, width - 1, 2, true) << cell(row.loss, 10, 4, false)
        << cell(row.alpha, 8, 2, false) << cell(row.kept, 7, 1, true) << cell(row.sign_agreement, 11, 1, true) << std::setw(12)
        << derivative_cell(row.directional_derivative) << std::setw(10) << samples_cell(row.forward_samples) << std::setw(10)
        << samples_cell(row.backward_samples) << "\n";
  }
  log << "(fwd, bwd: samples passed forward and backward on the shots and the support set to get the row)\n";
}

std::string samples_cell(long long samples) {
  if (samples < 0) return "-";
  std::ostringstream text;
  if (samples < 100000) text << samples;
  else if (samples < 100000000) text << std::fixed << std::setprecision(1) << static_cast<double>(samples) / 1e3 << "k";
  else text << std::fixed << std::setprecision(1) << static_cast<double>(samples) / 1e6 << "M";
  return text.str();
}

std::string derivative_cell(double derivative) {
  if (std::isnan(derivative)) return "-";
  std::ostringstream text;
  text << std::scientific << std::setprecision(2) << derivative;
  return text.str();
}

void add_derivative_summary(const std::vector<TransportRow>& rows, nlohmann::json& results) {
  for (const auto& row : rows) {
    if (row.method.rfind("GradFix", 0) == 0) results["directional_derivative"] = row.directional_derivative;
    if (row.method.rfind("B + alpha tau_A", 0) == 0) results["naive_directional_derivative"] = row.directional_derivative;
  }
}

nlohmann::json transport_rows_json(const std::vector<TransportRow>& rows) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& row : rows) {
    nlohmann::json entry = {{"method", row.method}, {"test_accuracy", row.accuracy}, {"test_loss", row.loss}, {"alpha", row.alpha},
                            {"kept", row.kept}, {"sign_agreement_with_tau_b", row.sign_agreement}};
    if (!std::isnan(row.directional_derivative)) entry["directional_derivative"] = row.directional_derivative;
    if (row.forward_samples >= 0) {
      entry["forward_samples"] = row.forward_samples;
      entry["backward_samples"] = row.backward_samples;
    }
    if (!row.curve.empty()) {
      nlohmann::json curve = nlohmann::json::array();
      for (const auto& point : row.curve) {
        curve.push_back({{"alpha", point.alpha}, {"support_loss", point.support_loss}, {"shots_loss", point.shots_loss}});
        if (std::isfinite(point.support_accuracy)) curve.back()["support_accuracy"] = point.support_accuracy;
      }
      entry["alpha_curve"] = curve;
    }
    out.push_back(entry);
  }
  return out;
}

}  // namespace gradfix
