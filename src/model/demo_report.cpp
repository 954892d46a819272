// The demos' tables and results entries (demo_report.hpp).
#include "demo_report.hpp"

#include <cmath>
#include <iomanip>
#include <sstream>

#include "transport_rows.hpp"

namespace gradfix {

std::pair<double, double> mean_and_spread(const std::vector<double>& values) {
  double mean = 0.0, squares = 0.0;
  for (double v : values) mean += v;
  mean /= static_cast<double>(values.size());
  for (double v : values) squares += (v - mean) * (v - mean);
  return {mean, values.size() > 1 ? std::sqrt(squares / static_cast<double>(values.size() - 1)) : 0.0};
}

std::string mean_cell(const std::vector<double>& values, bool spread) {
  const auto [mean, std] = mean_and_spread(values);
  std::ostringstream cell;
  cell << std::fixed << std::setprecision(2) << 100 * mean;
  if (spread && values.size() > 1) cell << " +- " << 100 * std;
  return cell.str();
}

void print_task_table(std::ostream& out, const std::string& first, const std::vector<std::string>& labels, const std::vector<std::string>& tasks,
                      const std::function<std::vector<double>(const std::string&, const std::string&)>& values) {
  out << std::left << std::setw(kLabelWidth) << first << std::right;
  for (const auto& task : tasks) out << std::setw(18) << task;
  out << std::setw(10) << "average" << "\n";
  for (const auto& label : labels) {
    out << std::left << std::setw(kLabelWidth) << label << std::right;
    std::vector<double> means;
    for (const auto& task : tasks) {
      const std::vector<double> cell = values(label, task);
      out << std::setw(18) << (cell.empty() ? "-" : mean_cell(cell));
      if (!cell.empty()) means.push_back(mean_and_spread(cell).first);
    }
    out << std::setw(10) << (means.size() == tasks.size() ? mean_cell(means, false) : "-") << "\n";
  }
}

namespace {

// A summary cell: "-" where the value is not known (negative), else fixed-point (in percent).
std::string optional_cell(double value, int precision, bool percent) {
  std::ostringstream text;
  if (value < 0) text << "-";
  else text << std::fixed << std::setprecision(precision) << (percent ? 100 * value : value) << (percent ? "%" : "");
  return text.str();
}

}  // namespace

void report_methods(std::ostream& out, const std::vector<std::string>& order, const std::vector<std::string>& tasks, const RowsByCell& cells,
                    const nlohmann::json& common, nlohmann::json& results) {
  static const std::vector<TransportRow> kNone;
  auto rows_of = [&](const std::string& method, const std::string& task) -> const std::vector<TransportRow>& {
    const auto found = cells.find({method, task});
    return found == cells.end() ? kNone : found->second;
  };
  out << std::left << std::setw(kLabelWidth) << "  (averages over tasks and seeds)" << std::right << std::setw(10) << "alpha" << std::setw(10) << "kept"
      << std::setw(12) << "agree(B)" << std::setw(12) << "<g,d>" << std::setw(10) << "fwd" << std::setw(10) << "bwd" << "\n";
  for (const auto& method : order) {
    double alpha = 0, kept = 0, agree = 0, derivative = 0, n = 0;
    double forward = 0, backward = 0;  // negative where the row's compute is not known
    for (const auto& task : tasks)
      for (const auto& row : rows_of(method, task)) {
        alpha += row.alpha;
        kept += row.kept;
        agree += row.sign_agreement;
        derivative += row.directional_derivative;
        forward += static_cast<double>(row.forward_samples);
        backward += static_cast<double>(row.backward_samples);
        n += 1;
      }
    out << std::left << std::setw(kLabelWidth) << ("  " + method) << std::right << std::setw(10) << optional_cell(alpha / n, 2, false) << std::setw(10)
        << optional_cell(kept / n, 1, true) << std::setw(12) << optional_cell(agree / n, 1, true) << std::setw(12) << derivative_cell(derivative / n)
        << std::setw(10) << samples_cell(forward < 0 ? -1 : std::llround(forward / n)) << std::setw(10)
        << samples_cell(backward < 0 ? -1 : std::llround(backward / n)) << "\n";
    for (const auto& task : tasks) {
      const std::vector<TransportRow>& rows = rows_of(method, task);
      if (rows.empty()) continue;
      std::vector<double> accuracies;
      double task_alpha = 0, task_derivative = 0, task_kept = 0, task_agreement = 0, task_forward = 0, task_backward = 0;
      std::vector<AlphaPoint> curve;  // the support set's loss per alpha, summed over the seeds
      for (const auto& row : rows) {
        accuracies.push_back(row.accuracy);
        task_alpha += row.alpha;
        task_derivative += row.directional_derivative;
        task_kept += row.kept;
        task_agreement += row.sign_agreement;
        task_forward += static_cast<double>(row.forward_samples);
        task_backward += static_cast<double>(row.backward_samples);
        if (curve.empty()) curve.resize(row.curve.size());
        for (std::size_t i = 0; i < row.curve.size() && i < curve.size(); ++i) {
          curve[i].alpha = row.curve[i].alpha;
          curve[i].support_loss += row.curve[i].support_loss;
          curve[i].shots_loss += row.curve[i].shots_loss;
          curve[i].support_accuracy = (std::isfinite(curve[i].support_accuracy) ? curve[i].support_accuracy : 0.0) + row.curve[i].support_accuracy;
        }
      }
      const double count = static_cast<double>(accuracies.size());
      const auto [mean, spread] = mean_and_spread(accuracies);
      nlohmann::json entry = {{"task", task}, {"method", method}, {"test_accuracy_mean", mean}, {"test_accuracy_std", spread},
                              {"test_accuracies", accuracies}, {"alpha_mean", task_alpha / count}};
      for (const auto& [key, value] : common.items()) entry[key] = value;
      if (!std::isnan(task_derivative)) entry["directional_derivative_mean"] = task_derivative / count;
      if (task_kept >= 0) entry["kept_mean"] = task_kept / count;
      if (task_agreement >= 0) entry["sign_agreement_mean"] = task_agreement / count;
      if (task_forward >= 0) {
        entry["forward_samples_mean"] = task_forward / count;
        entry["backward_samples_mean"] = task_backward / count;
      }
      if (!curve.empty()) {
        nlohmann::json points = nlohmann::json::array();
        for (const auto& point : curve)
          points.push_back({{"alpha", point.alpha}, {"support_loss_mean", point.support_loss / count}, {"shots_loss_mean", point.shots_loss / count},
                            {"support_accuracy_mean", point.support_accuracy / count}});
        entry["alpha_curve_mean"] = points;
      }
      results.push_back(entry);
    }
  }
}

}  // namespace gradfix
