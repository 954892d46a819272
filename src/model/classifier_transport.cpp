// The classifiers' transport: a replicated classifier as a transport target (transport.hpp).
#include <optional>
#include <set>

#include "classifier.hpp"
#include "classifier_jobs.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/algebra/mask.hpp"
#include "shots.hpp"
#include "transport.hpp"
#include "transport_rows.hpp"

namespace gradfix {
// The transport of one (K, seed): shots and support from the pool, statistics on the shots,
// alpha chosen on the support set, the test set read only at the end.
// The shots of a transport (by its selection) and its support set: the next support_size
// samples of a seeded shuffle of the rest of the pool.
void shots_and_support(TransportInputs& in, const TransportJob& job, const JobContext& context, Dataset& shots, Dataset& support) {
  const auto shot_indices = classifier_shots(*in.target, in.pool, job.data.spec, job.selection, job.shots_per_class, job.seed);
  save_chosen_shots(job.selection, shot_indices, context);
  auto rest = complement(in.pool.size(), shot_indices);
  const auto order = shuffled_indices(static_cast<long long>(rest.size()), job.seed + 17);
  std::vector<long long> support_indices;
  for (long long i = 0; i < std::min<long long>(job.support_size, static_cast<long long>(rest.size())); ++i)
    support_indices.push_back(rest[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])]);
  if (support_indices.empty()) throw InputError("the pool has no samples left for the support set after the shots");
  if (context.is_root() && !job.save_support.empty()) write_indices(job.save_support, support_indices);
  shots = in.pool.subset(shot_indices);
  support = in.pool.subset(support_indices);
  shots.classes = support.classes = in.pool.classes;
}

namespace {

// A classifier replicated on every rank, as a transport target (transport.hpp): the statistics
// are computed data-parallel over the ranks (descent_statistics), every score on every rank whole.
// Vectors are whole tensors in name order, the order of `Vectors`, so that sums over the model
// (<g, d>) add in the same order as before the recipe.
class ReplicatedTarget final : public TransportTarget {
 public:
  ReplicatedTarget(TransportInputs& in, const TransportJob& job, const JobContext& context)
      : model_(*in.target), in_(in), job_(job), context_(context), base_(parameter_values(model_)),
        source_(job.data.spec.empty() ? "the few-shot pool" : job.data.spec) {
    shots_and_support(in, job, context, shots_, support_);
    for (auto& [name, parameter] : model_.parameters()) shapes_[name] = std::vector<long long>(parameter.sizes().begin(), parameter.sizes().end());
    for (const auto& entry : base_) names_.push_back(entry.first);
    // The few-shot fine-tuning rows: every tensor tuned, or some frozen (--finetune-freeze), or both.
    if (job.few_shot_baseline) {
      if (job.finetune_freeze.empty() || job.few_shot_unfrozen_too) few_shot_variants_.push_back({"", {}});
      if (!job.finetune_freeze.empty()) {
        std::string patterns;
        // The user's own patterns, as given (a label, not a name read from a file).
        for (const auto& pattern : job.finetune_freeze) patterns += (patterns.empty() ? "" : " ") + pattern;
        few_shot_variants_.push_back({" (" + (job.finetune_freeze_label.empty() ? "frozen: " + patterns : job.finetune_freeze_label) + ")",
                                      frozen_tensors(model_, job.finetune_freeze, "--finetune-freeze", job.target.empty() ? "B" : job.target)});
      }
    }
  }

  long long shots() const { return shots_.size(); }
  long long support() const { return support_.size(); }
  std::size_t finetune_runs() const { return finetune_lrs().size() * few_shot_variants_.size(); }
  std::vector<long long> finetune_steps() const { return job_.finetune_steps.empty() ? std::vector<long long>{5, 20, 50} : job_.finetune_steps; }
  std::vector<double> finetune_lrs() const { return job_.finetune_lrs.empty() ? std::vector<double>{1e-4, 1e-3, 1e-2} : job_.finetune_lrs; }
  const Vectors& base() const { return base_; }

  ParameterVector vector_of(const Vectors& vectors) const {
    ParameterVector out;
    for (const auto& name : names_) out.push_back(vectors.at(name));
    return out;
  }
  Vectors vectors_of(const ParameterVector& vector) const {
    Vectors out;
    for (std::size_t k = 0; k < names_.size(); ++k) out[names_[k]] = vector[k];
    return out;
  }

  ParameterVector statistics(SignMode mode) override {
    return vector_of(descent_statistics(model_, shots_, mode, VoteMethod::kFast, context_, source_));
  }

  ParameterVector mean_gradient(const ParameterVector* mean_statistics) override {
    ParameterVector gradient = mean_statistics != nullptr ? *mean_statistics : statistics(SignMode::kMean);
    for (auto& values : gradient)
      for (auto& value : values) value = static_cast<float>(-static_cast<double>(value) / static_cast<double>(shots_.size()));
    return gradient;
  }

  ParameterVector mask(MaskMode mode, const MaskOptions& options, const ParameterVector& tau, const ParameterVector& statistics) override {
    ParameterVector out;
    for (std::size_t k = 0; k < names_.size(); ++k)
      out.push_back(mask_tensor(mode, options, tau[k], statistics[k], shapes_.at(names_[k]), tensor_key_of(names_[k])));
    return out;
  }

  PairStats compare(const ParameterVector& a, const ParameterVector& b) override {
    PairStats stats;
    for (std::size_t k = 0; k < a.size(); ++k) stats.add(a[k].data(), b[k].data(), static_cast<long long>(a[k].size()));
    return stats;
  }

  double dot(const ParameterVector& a, const ParameterVector& b) override {
    double sum = 0.0;
    for (std::size_t k = 0; k < a.size(); ++k)
      for (std::size_t i = 0; i < a[k].size(); ++i) sum += static_cast<double>(a[k][i]) * b[k][i];
    return sum;
  }

  Score score(const ParameterVector* delta, double alpha, Split split) override {
    const Dataset& data = split == Split::kShots ? shots_ : split == Split::kSupport ? support_ : in_.test;
    if (delta == nullptr) return as_score(evaluate(model_, data));
    return as_score(evaluate_with(model_, base_, vectors_of(*delta), alpha, data));
  }

  std::vector<TransportRow> finetune_rows(const ParameterVector& gradient, const FinetuneStart& start) override {
    (void)gradient;  // the classifiers' few-shot rows report no <g, d>
    // B + alpha * delta as score() sets it, so that fine-tuning starts from the model GradFix scored.
    Vectors begin = base_;
    if (start.delta != nullptr) {
      set_moved_parameters(model_, base_, vectors_of(*start.delta), start.alpha);
      begin = parameter_values(model_);
      set_parameter_values(model_, base_);
    }
    std::vector<TransportRow> rows;
    for (const auto& [variant, frozen] : few_shot_variants_) {
      TransportRow row;
      set_parameter_values(model_, finetuned(frozen, begin, row));
      const Evaluation test = evaluate(model_, in_.test);
      const long long forward = row.forward_samples, backward = row.backward_samples;
      row = make_transport_row(start.label + variant, test.accuracy, test.loss, -1, -1, -1);
      row.forward_samples = forward;
      row.backward_samples = backward;
      rows.push_back(row);
      set_parameter_values(model_, base_);
    }
    return rows;
  }
  long long shot_count() const override { return shots_.size(); }
  long long support_count() const override { return support_.size(); }

  std::optional<Score> target_finetuned_score() override {
    if (in_.target_finetuned.empty()) return std::nullopt;
    set_parameter_values(model_, in_.target_finetuned);
    const Evaluation test = evaluate(model_, in_.test);
    set_parameter_values(model_, base_);
    return as_score(test);
  }

 private:
  static Score as_score(const Evaluation& evaluation) { return {evaluation.loss, evaluation.accuracy}; }

  // Few-shot fine-tuning from `start` on the shots, learning rate and steps chosen on the support
  // set's accuracy; the frozen tensors are left out of the optimizer. Returns the chosen
  // parameters; `compute` gets the samples passed forward and backward.
  Vectors finetuned(const std::set<std::string>& frozen, const Vectors& start, TransportRow& compute) {
    double best_accuracy = -1.0;
    Vectors best = start;
    compute.forward_samples = compute.backward_samples = 0;
    const std::vector<long long> step_counts = finetune_steps();
    for (double lr : finetune_lrs()) {
      set_parameter_values(model_, start);
      std::vector<torch::Tensor> parameters;
      for (auto& [name, parameter] : model_.parameters())
        if (frozen.count(name) == 0) parameters.push_back(parameter);
      torch::optim::Adam optimizer(parameters, torch::optim::AdamOptions(lr));
      const torch::Tensor inputs = inputs_tensor(shots_, model_.device()), labels = labels_tensor(shots_, model_.device());
      long long done = 0;
      for (long long steps : step_counts) {
        for (; done < steps; ++done) {
          optimizer.zero_grad();
          torch::nn::functional::cross_entropy(model_.forward(inputs), labels).backward();
          optimizer.step();
          count_progress(shots_.size());
          compute.forward_samples += shots_.size();
          compute.backward_samples += shots_.size();
        }
        const double accuracy = evaluate(model_, support_).accuracy;
        compute.forward_samples += support_.size();
        if (accuracy > best_accuracy) {
          best_accuracy = accuracy;
          best = parameter_values(model_);
        }
      }
    }
    set_parameter_values(model_, base_);
    return best;
  }

  Classifier& model_;
  TransportInputs& in_;
  const TransportJob& job_;
  const JobContext& context_;
  const Vectors base_;
  const std::string source_;
  Dataset shots_, support_;
  std::map<std::string, std::vector<long long>> shapes_;
  std::vector<std::string> names_;  // name order: the order of Vectors
  std::vector<std::pair<std::string, std::set<std::string>>> few_shot_variants_;
};

TransportRecipe classifier_recipe(const TransportJob& job) { return transport_recipe(job, AlphaPolicy::Metric::kSupportAccuracy); }

}  // namespace

// GradFix's test accuracy alone (the ablations' row): the shots' statistics, the mask, alpha on
// the support set, the test set once; the other rows of a transport are not computed.
// `control` (optional) replaces the masked vector by one derived from it (the ablation's random
// control at the mask's kept count).
double gradfix_accuracy(TransportInputs& in, const TransportJob& job, const JobContext& context,
                        const std::function<Vectors(const Vectors&)>& control) {
  ReplicatedTarget target(in, job, context);
  TransportRecipe recipe = classifier_recipe(job);
  if (control) recipe.control = [&](const ParameterVector& masked) { return target.vector_of(control(target.vectors_of(masked))); };
  return gradfix_row(target, target.vector_of(in.tau), recipe).accuracy;
}

// Every row of a classifier's transport (transport.hpp); `transported` (optional) gets B + alpha
// * masked tau at GradFix's alpha. The demo runs many short transports: only a transport of its
// own reports progress.
std::vector<TransportRow> transport_core(TransportInputs& in, const TransportJob& job, const JobContext& context,
                                         Vectors* transported, bool report_progress) {
  ReplicatedTarget target(in, job, context);
  const TransportRecipe recipe = classifier_recipe(job);
  Progress progress(context, "transport",
                    transport_sample_passes(job.sign_mode, target.shots(), target.support(), in.test.size(), recipe.alpha.grid.size(),
                                            !in.tau_b.empty(), target.finetune_runs(), target.finetune_steps(), !in.target_finetuned.empty(),
                                            job.gradfix_finetune ? 2 : 1),
                    0, "samples");
  std::optional<CurrentProgress> current;
  if (report_progress) current.emplace(progress);
  const ParameterVector tau_b = in.tau_b.empty() ? ParameterVector() : target.vector_of(in.tau_b);
  const TransportOutcome outcome = run_transport_recipe(target, target.vector_of(in.tau), in.tau_b.empty() ? nullptr : &tau_b, recipe);
  if (transported != nullptr) {
    *transported = target.base();
    const Vectors masked = target.vectors_of(outcome.masked);
    for (auto& [name, values] : *transported)
      for (std::size_t i = 0; i < values.size(); ++i) values[i] += static_cast<float>(outcome.gradfix_alpha) * masked.at(name)[i];
  }
  progress.finish();
  return outcome.rows;
}

}  // namespace gradfix
