#pragma once
// Internal to the LibTorch part: the one transport recipe. Every model kind (replicated
// classifiers, Hugging Face models with their parameters sharded) implements TransportTarget:
// few-shot statistics, masks, scores of B + alpha * delta on a split, few-shot fine-tuning, and
// the rows the recipe builds from them are the same rows in the same order for every kind:
//
//   B zero-shot, B + alpha tau_A (naive), GradFix, oracle mask sign(tau_B) (with B_ft),
//   few-shot fine-tuning of B (each variant the target runs), B fine-tuned (upper bound).
//
// Each searched row chooses alpha by an explicit AlphaPolicy (its grid, and whether the support
// set's accuracy or its mean loss decides); the test set is read only to score the chosen alpha.

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "gradfix/algebra/compare.hpp"
#include "gradfix/algebra/mask.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {

// A vector over the parameters as a target holds them: whole tensors in a fixed order (replicated
// classifiers), or this rank's pieces of the shard plan (sharded models). Only its target reads
// the layout; the recipe passes vectors between the target's operations.
using ParameterVector = std::vector<std::vector<float>>;

// How alpha is chosen for a searched row.
struct AlphaPolicy {
  enum class Metric {
    kSupportAccuracy,  // the highest support accuracy; ties: the earlier alpha of the grid
    kSupportLoss,      // the lowest finite support mean loss; ties: the earlier alpha of the grid
  };
  std::vector<double> grid = default_alphas();
  Metric metric = Metric::kSupportLoss;

  // The index into `grid` of the alpha `curve` (one point per grid alpha) chooses. With the loss
  // metric and no finite loss at all, an InputError says to try smaller alphas.
  std::size_t choose(const std::vector<AlphaPoint>& curve) const;
  // "support accuracy" or "support mean loss", as results.json and the log say it.
  std::string description() const;
};

// The splits a score is taken on.
enum class Split { kShots, kSupport, kTest };

struct Score {
  double loss = 0.0;      // mean over samples of the per-sample loss
  double accuracy = 0.0;  // correct predictions over counted targets (samples or tokens)
};

// Where few-shot fine-tuning starts: B, or B + alpha * delta (GradFix's transported model, the
// same shots and the same learning-rate and step search after it). `label` begins each row's
// method; a variant of the target's adds its own words after it.
struct FinetuneStart {
  std::string label = "few-shot fine-tuning of B";
  const ParameterVector* delta = nullptr;  // null: B itself
  double alpha = 0.0;
};

class TransportTarget {
 public:
  virtual ~TransportTarget() = default;
  // The shots' statistics in `mode` (vote counts; summed -gradients in mean mode), complete over
  // the ranks.
  virtual ParameterVector statistics(SignMode mode) = 0;
  // g, the mean gradient of B's loss on the shots. `mean_statistics`: the mean-mode statistics when
  // they were computed already (the summed -gradients), else null (one more pass).
  virtual ParameterVector mean_gradient(const ParameterVector* mean_statistics) = 0;
  // `tau` masked by `statistics` as `gradfix mask` masks whole tensors.
  virtual ParameterVector mask(MaskMode mode, const MaskOptions& options, const ParameterVector& tau, const ParameterVector& statistics) = 0;
  // Pair statistics of two vectors over the whole model.
  virtual PairStats compare(const ParameterVector& a, const ParameterVector& b) = 0;
  // <a, b> over the whole model.
  virtual double dot(const ParameterVector& a, const ParameterVector& b) = 0;
  // B + alpha * delta (B itself when `delta` is null) on a split.
  virtual Score score(const ParameterVector* delta, double alpha, Split split) = 0;
  // The few-shot fine-tuning rows (every variant the target runs), each on the test set, each
  // with the samples its fine-tuning passed forward and backward; `gradient` is g, for the rows'
  // <g, d> where the target reports it. Fine-tuning starts at `start`.
  virtual std::vector<TransportRow> finetune_rows(const ParameterVector& gradient, const FinetuneStart& start) = 0;
  // The samples of the shots and of the support set, for the rows' compute.
  virtual long long shot_count() const = 0;
  virtual long long support_count() const = 0;
  // B's own fine-tune on the test set, when the job gave one.
  virtual std::optional<Score> target_finetuned_score() = 0;
};

struct TransportRecipe {
  SignMode sign_mode = SignMode::kMax;
  MaskMode mask_mode = MaskMode::kNormal;
  MaskOptions mask;
  AlphaPolicy alpha;
  bool few_shot = true;  // the few-shot fine-tuning rows
  // With few_shot: the same fine-tuning again from GradFix's transported model.
  bool gradfix_finetune = true;
  // Replaces the masked vector before its alpha is searched (the demo's random control at the
  // mask's kept count); null: none.
  std::function<ParameterVector(const ParameterVector& masked)> control;
};

// The recipe a job's options ask for, with the alpha metric of its kind of model.
TransportRecipe transport_recipe(const TransportJob& job, AlphaPolicy::Metric metric);

struct TransportOutcome {
  std::vector<TransportRow> rows;
  double gradfix_alpha = 0.0;
  ParameterVector masked;  // GradFix's masked tau: the transported model is B + gradfix_alpha * masked
};

// Every row. `tau_b` (B_ft - B) adds the oracle row. Collective where the target is.
TransportOutcome run_transport_recipe(TransportTarget& target, const ParameterVector& tau, const ParameterVector* tau_b,
                                      const TransportRecipe& recipe);
// GradFix's row alone (the ablations): statistics, mask, alpha, one test score; no gradient pass.
TransportRow gradfix_row(TransportTarget& target, const ParameterVector& tau, const TransportRecipe& recipe);

// The GradFix row's label: "GradFix (max, normal)".
std::string gradfix_label(SignMode sign_mode, MaskMode mask_mode);

}  // namespace gradfix
