// The one transport recipe (transport.hpp): the rows every target gets, in one order.
#include "transport.hpp"

#include <cmath>
#include <limits>

#include "gradfix/io/error.hpp"
#include "transport_rows.hpp"

namespace gradfix {

std::size_t AlphaPolicy::choose(const std::vector<AlphaPoint>& curve) const {
  GRADFIX_CHECK(!curve.empty() && curve.size() == grid.size(), "an alpha curve needs one point per grid alpha");
  std::size_t best = 0;
  if (metric == Metric::kSupportAccuracy) {
    for (std::size_t i = 1; i < curve.size(); ++i)
      if (curve[i].support_accuracy > curve[best].support_accuracy) best = i;
    return best;
  }
  // A grid point whose loss is not finite (an alpha that overshoots) is never chosen.
  bool found = false;
  for (std::size_t i = 0; i < curve.size(); ++i)
    if (std::isfinite(curve[i].support_loss) && (!found || curve[i].support_loss < curve[best].support_loss)) {
      best = i;
      found = true;
    }
  if (!found) throw InputError("every alpha of the grid gives a non-finite loss on the support set; try smaller alphas");
  return best;
}

std::string AlphaPolicy::description() const { return metric == Metric::kSupportAccuracy ? "support accuracy" : "support mean loss"; }

TransportRecipe transport_recipe(const TransportJob& job, AlphaPolicy::Metric metric) {
  TransportRecipe recipe;
  recipe.sign_mode = job.sign_mode;
  recipe.mask_mode = job.mask_mode;
  recipe.mask = job.mask;
  recipe.alpha.grid = job.alphas.empty() ? default_alphas() : job.alphas;
  recipe.alpha.metric = metric;
  recipe.few_shot = job.few_shot_baseline;
  recipe.gradfix_finetune = job.gradfix_finetune;
  return recipe;
}

std::string gradfix_label(SignMode sign_mode, MaskMode mask_mode) {
  return std::string("GradFix (") + sign_mode_name(sign_mode) + ", " + mask_mode_name(mask_mode) + ")";
}

namespace {

double kept_fraction(const PairStats& kept) {
  return kept.nonzero_b > 0 ? static_cast<double>(kept.nonzero_a) / static_cast<double>(kept.nonzero_b) : 0.0;
}

// B + alpha * delta for every alpha of the grid on the support set (and the shots' own loss, for
// the curve), the alpha the policy chooses, then that alpha once on the test set. Its compute: the
// grid's forward passes over the support set and the shots (the test set, which every row reads
// once, is not counted).
TransportRow searched_row(TransportTarget& target, const AlphaPolicy& policy, const std::string& method, const ParameterVector& delta,
                          double kept, double agreement) {
  std::vector<AlphaPoint> curve;
  for (double alpha : policy.grid) {
    const Score support = target.score(&delta, alpha, Split::kSupport);
    curve.push_back({alpha, support.loss, target.score(&delta, alpha, Split::kShots).loss, support.accuracy});
  }
  const double alpha = policy.grid[policy.choose(curve)];
  const Score test = target.score(&delta, alpha, Split::kTest);
  TransportRow row = make_transport_row(method, test.accuracy, test.loss, alpha, kept, agreement);
  row.curve = curve;
  row.forward_samples = static_cast<long long>(policy.grid.size()) * (target.support_count() + target.shot_count());
  row.backward_samples = 0;
  return row;
}

// GradFix's statistics: one forward and one backward pass of every shot (per-sample votes cost the
// same passes as their mean).
void add_statistics_compute(TransportTarget& target, TransportRow& row) {
  row.forward_samples += target.shot_count();
  row.backward_samples += target.shot_count();
}

}  // namespace

TransportOutcome run_transport_recipe(TransportTarget& target, const ParameterVector& tau, const ParameterVector* tau_b,
                                      const TransportRecipe& recipe) {
  TransportOutcome out;
  auto& rows = out.rows;
  const ParameterVector statistics = target.statistics(recipe.sign_mode);
  // g: from the same pass in mean mode (the statistics are the summed -gradients), one more in max mode.
  const ParameterVector gradient = target.mean_gradient(recipe.sign_mode == SignMode::kMean ? &statistics : nullptr);
  auto add_searched = [&](const std::string& method, const ParameterVector& delta, double kept, double agreement) {
    rows.push_back(searched_row(target, recipe.alpha, method, delta, kept, agreement));
    rows.back().directional_derivative = target.dot(gradient, delta);
    return rows.back().alpha;
  };

  const Score zero_shot = target.score(nullptr, 0.0, Split::kTest);
  rows.push_back(make_transport_row("B zero-shot", zero_shot.accuracy, zero_shot.loss, -1, -1, -1));
  rows.back().forward_samples = rows.back().backward_samples = 0;
  add_searched("B + alpha tau_A (naive)", tau, 1.0, -1);

  out.masked = target.mask(recipe.mask_mode, recipe.mask, tau, statistics);
  if (recipe.control) out.masked = recipe.control(out.masked);
  const double agreement = tau_b != nullptr ? target.compare(statistics, *tau_b).sign_agreement() : -1;
  out.gradfix_alpha = add_searched(gradfix_label(recipe.sign_mode, recipe.mask_mode), out.masked,
                                   kept_fraction(target.compare(out.masked, tau)), agreement);
  add_statistics_compute(target, rows.back());
  const TransportRow gradfix = rows.back();

  if (tau_b != nullptr) {
    const ParameterVector oracle = target.mask(MaskMode::kOracle, recipe.mask, tau, *tau_b);
    const PairStats kept = target.compare(oracle, tau);
    add_searched("oracle mask sign(tau_B)", oracle, static_cast<double>(kept.nonzero_a) / static_cast<double>(std::max(1LL, kept.nonzero_b)),
                 1.0);
  }
  if (recipe.few_shot) {
    for (auto& row : target.finetune_rows(gradient, FinetuneStart{})) rows.push_back(std::move(row));
    // The same fine-tuning from B + alpha * masked tau: it costs GradFix's passes and the few-shot row's.
    if (recipe.gradfix_finetune)
      for (auto& row : target.finetune_rows(gradient, FinetuneStart{"GradFix + few-shot fine-tuning", &out.masked, out.gradfix_alpha})) {
        row.forward_samples += gradfix.forward_samples;
        row.backward_samples += gradfix.backward_samples;
        rows.push_back(std::move(row));
      }
  }
  if (const auto upper = target.target_finetuned_score())
    rows.push_back(make_transport_row("B fine-tuned (upper bound)", upper->accuracy, upper->loss, -1, -1, -1));
  return out;
}

TransportRow gradfix_row(TransportTarget& target, const ParameterVector& tau, const TransportRecipe& recipe) {
  const ParameterVector statistics = target.statistics(recipe.sign_mode);
  ParameterVector masked = target.mask(recipe.mask_mode, recipe.mask, tau, statistics);
  if (recipe.control) masked = recipe.control(masked);
  TransportRow row = searched_row(target, recipe.alpha, gradfix_label(recipe.sign_mode, recipe.mask_mode), masked,
                                  kept_fraction(target.compare(masked, tau)), -1);
  add_statistics_compute(target, row);
  return row;
}

}  // namespace gradfix
