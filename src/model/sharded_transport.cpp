#include "sharded_transport.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <nlohmann/json.hpp>

#include "gradfix/dist/backend.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/exact_sum.hpp"
#include "gradfix/io/dataset.hpp"
#include "gradfix/dist/collective_output.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/algebra/compare.hpp"
#include "gradfix/algebra/mask.hpp"
#include "gradfix/jobs/jobs.hpp"
#include "sharded_executor.hpp"
#include "statistics_cache.hpp"
#include "shots.hpp"
#include "transport.hpp"
#include "transport_rows.hpp"

namespace gradfix {
namespace {

using Pieces = std::vector<std::vector<float>>;

// The weights as they are gathered now (with their offset) on `data`. A non-finite loss is
// reported, not refused: an alpha that overshoots is a grid point to pass over.
Score score(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data, const JobContext& context,
            const torch::Device& device) {
  const ShardedEvaluation evaluation = sharded_evaluation(model, weights, data, context, device, false);
  Score result;
  result.loss = evaluation.mean_loss();
  result.accuracy = static_cast<double>(evaluation.hits) / static_cast<double>(std::max(1LL, evaluation.targets));
  return result;
}

// <g, d> summed over the ranks' pieces: g the mean gradient, d an update, both in plan order.
// Each product of two floats is exact in double and the sum is exact (ExactSum), so the value
// does not depend on where P puts the piece boundaries.
double directional_derivative(const Pieces& gradient, const Pieces& update, const JobContext& context) {
  ExactSum sum;
  for (std::size_t k = 0; k < gradient.size(); ++k)
    for (std::size_t i = 0; i < gradient[k].size(); ++i) sum.add(static_cast<double>(gradient[k][i]) * update[k][i]);
  return allreduce_exact_sum(context.host(), sum);
}

// The mask of this rank's pieces of tau against `statistics` (pieces in plan order). The sums
// some modes need over a row or a tensor are completed over the ranks first, as `gradfix mask`
// does, so the result is that of masking whole tensors.
Pieces mask_pieces(const std::vector<TensorInfo>& layout, const ShardPlan& plan, const JobContext& context, MaskMode mode,
                   const MaskOptions& options, const Pieces& tau, const Pieces& statistics) {
  const auto& pieces = plan.pieces(context.rank());
  std::map<std::size_t, std::vector<double>> sums;
  for (std::size_t t = 0; t < layout.size(); ++t) {
    const MaskPlan mask = plan_mask(mode, layout[t].shape);
    if (mask.sums_per_row > 0) sums[t].assign(static_cast<std::size_t>(mask.rows * mask.sums_per_row), 0.0);
  }
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    const auto found = sums.find(pieces[k].tensor);
    if (found != sums.end())
      accumulate_mask_sums(plan_mask(mode, layout[pieces[k].tensor].shape), options, tau[k].data(), statistics[k].data(),
                           pieces[k].begin, pieces[k].count, found->second.data());
  }
  if (context.size() > 1)
    for (auto& [tensor, values] : sums) context.host().allreduce(values.data(), values.data(), values.size(), DType::kF64, ReduceOp::kSum);
  Pieces masked(pieces.size());
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    const TensorInfo& tensor = layout[pieces[k].tensor];
    masked[k].resize(tau[k].size());
    const auto found = sums.find(pieces[k].tensor);
    apply_mask(plan_mask(mode, tensor.shape), options, tau[k].data(), statistics[k].data(), pieces[k].begin, pieces[k].count,
               found == sums.end() ? nullptr : found->second.data(), tensor_key_of(tensor.name), masked[k].data());
  }
  return masked;
}

// Pair statistics of two piece lists, summed over the ranks (the counts; what the rows show).
PairStats pair_stats(const Pieces& a, const Pieces& b, const JobContext& context) {
  PairStats stats;
  for (std::size_t k = 0; k < a.size(); ++k) stats.add(a[k].data(), b[k].data(), static_cast<long long>(a[k].size()));
  long long counts[4] = {stats.count, stats.sign_agreements, stats.nonzero_a, stats.nonzero_b};
  context.host().allreduce(counts, counts, 4, DType::kI64, ReduceOp::kSum);
  stats.count = counts[0];
  stats.sign_agreements = counts[1];
  stats.nonzero_a = counts[2];
  stats.nonzero_b = counts[3];
  return stats;
}

// What few-shot fine-tuning chose, for the log and results.json.
struct FinetuneChoice {
  double lr = 0.0;
  long long steps = 0;
  double support_loss = 0.0;
  // Samples passed forward and backward over every run (the row's compute).
  long long forward_samples = 0;
  long long backward_samples = 0;
};

}  // namespace

ShardedAdam::ShardedAdam(const Pieces& shape, const Pieces* start) {
  update_.resize(shape.size());
  for (std::size_t k = 0; k < shape.size(); ++k) update_[k].assign(shape[k].size(), 0.0f);
  first_ = second_ = update_;
  if (start != nullptr) update_ = *start;
}

void ShardedAdam::step(const ShardedStatistics& statistics, double lr) {
  constexpr double kBeta1 = 0.9, kBeta2 = 0.999, kEpsilon = 1e-8;
  ++steps_;
  const double scale = -1.0 / static_cast<double>(statistics.samples);  // summed -gradients -> mean gradient
  const double correct1 = 1.0 - std::pow(kBeta1, static_cast<double>(steps_));
  const double correct2 = 1.0 - std::pow(kBeta2, static_cast<double>(steps_));
  std::vector<float> gradient;
  for (std::size_t k = 0; k < update_.size(); ++k) {
    gradient.resize(update_[k].size());
    statistics.read_f32(k, 0, static_cast<long long>(gradient.size()), gradient.data());
    for (std::size_t i = 0; i < gradient.size(); ++i) {
      const double g = scale * static_cast<double>(gradient[i]);
      const double m = kBeta1 * first_[k][i] + (1.0 - kBeta1) * g;
      const double v = kBeta2 * second_[k][i] + (1.0 - kBeta2) * g * g;
      first_[k][i] = static_cast<float>(m);
      second_[k][i] = static_cast<float>(v);
      update_[k][i] -= static_cast<float>(lr * (m / correct1) / (std::sqrt(v / correct2) + kEpsilon));
    }
  }
}

std::vector<std::vector<float>> sharded_train(const LayeredModel& model, ShardedWeights& weights, const SampleSource& data, int epochs,
                                              long long batch, double lr, std::uint64_t seed, const JobContext& context,
                                              const torch::Device& device) {
  ShardedSignsOptions options;
  options.sign_mode = SignMode::kMean;
  ShardedAdam adam(weights.pieces(), nullptr);
  weights.set_offset(&adam.update(), 1.0f);
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const std::vector<long long> order = shuffled_indices(data.samples, seed * 1000003ULL + static_cast<std::uint64_t>(epoch));
    for (long long first = 0; first < data.samples; first += batch) {
      // This step's samples: a view of `data` that maps a step's indices to the shuffled order.
      const std::vector<long long> chosen(order.begin() + first, order.begin() + std::min(data.samples, first + batch));
      SampleSource step;
      step.samples = static_cast<long long>(chosen.size());
      step.name = data.name;
      step.batch = [&data, chosen](const std::vector<long long>& indices, const torch::Device& where) {
        std::vector<long long> mapped;
        for (long long index : indices) mapped.push_back(chosen[static_cast<std::size_t>(index)]);
        return data.batch(mapped, where);
      };
      adam.step(sharded_statistics(model, weights, step, options, context, device), lr);
    }
  }
  weights.set_offset(nullptr, 0.0f);
  return adam.update();
}

namespace {

// Few-shot fine-tuning of B with the parameters sharded: full-batch Adam on the shots (the mean
// cross-entropy, as torch.optim.Adam with its defaults would take it), one run per learning rate,
// the support set scored after each step count of the grid; the (learning rate, steps) with the
// lowest support mean loss wins, the same rule that chooses alpha. Each rank updates only its own
// pieces (ShardedAdam), so the optimiser's memory is sharded too (the update, two moments and the
// best update so far: four float32 copies of a rank's pieces). `start` (null: B itself) is where
// every run starts, as B + 1 * start. Returns the chosen update, to be evaluated as B + 1 * update.
Pieces sharded_finetune(const LayeredModel& model, ShardedWeights& weights, const SampleSource& shots, const SampleSource& support,
                        const std::vector<double>& lrs, const std::vector<long long>& step_counts, const JobContext& context,
                        const torch::Device& device, const Pieces* start, FinetuneChoice& choice) {
  ShardedSignsOptions options;
  options.sign_mode = SignMode::kMean;
  options.refuse_nonfinite = false;
  Pieces best;
  choice.support_loss = std::numeric_limits<double>::infinity();
  for (double lr : lrs) {
    ShardedAdam adam(weights.pieces(), start);
    weights.set_offset(&adam.update(), 1.0f);
    long long done = 0;
    for (long long steps : step_counts) {
      for (; done < steps; ++done) {
        adam.step(sharded_statistics(model, weights, shots, options, context, device), lr);
        choice.forward_samples += shots.samples;
        choice.backward_samples += shots.samples;
      }
      const double loss = score(model, weights, support, context, device).loss;
      choice.forward_samples += support.samples;
      if (!std::isfinite(loss)) break;  // diverged: later steps at this rate are not candidates
      if (loss < choice.support_loss) {
        choice.lr = lr;
        choice.steps = steps;
        choice.support_loss = loss;
        best = adam.update();
      }
    }
  }
  weights.set_offset(nullptr, 0.0f);
  if (best.empty()) throw InputError("few-shot fine-tuning diverged at every learning rate of --finetune-lrs; try smaller ones");
  return best;
}

Pieces difference(const Pieces& a, const Pieces& b) {
  Pieces out = a;
  for (std::size_t k = 0; k < out.size(); ++k)
    for (std::size_t i = 0; i < out[k].size(); ++i) out[k][i] -= b[k][i];
  return out;
}

// A model whose parameters are sharded over the ranks, as a transport target (transport.hpp):
// vectors are this rank's pieces of the shard plan; every score gathers one stage at a time; sums
// over the model are completed over the ranks.
class ShardedTarget final : public TransportTarget {
 public:
  ShardedTarget(const TransportJob& job, const LayeredModel& model, ShardedWeights& weights, const ShardedTransportData& data,
                const torch::Device& device, const JobContext& context)
      : job_(job), model_(model), weights_(weights), data_(data), device_(device), context_(context) {}

  const FinetuneChoice& finetune_choice() const { return finetuned_; }
  const FinetuneChoice& gradfix_finetune_choice() const { return gradfix_finetuned_; }
  std::vector<double> finetune_lrs() const { return job_.finetune_lrs.empty() ? std::vector<double>{1e-5, 3e-5, 1e-4} : job_.finetune_lrs; }
  std::vector<long long> finetune_steps() const { return job_.finetune_steps.empty() ? std::vector<long long>{5, 20, 50} : job_.finetune_steps; }

  ParameterVector statistics(SignMode mode) override {
    ShardedSignsOptions options;
    options.sign_mode = mode;
    // The votes' products may be narrowed; the mean gradient (<g, d>) stays float32.
    if (mode == SignMode::kMax) options.precision = job_.vote_precision;
    if (job_.statistics_cache.empty()) return sharded_statistics(model_, weights_, data_.shots, options, context_, device_).to_f32();
    // The same B, shots and sign mode give the same statistics: read them when an earlier run
    // (another point of a sweep) kept them.
    const StatisticsCache cache(job_.statistics_cache);
    // B, its config and the shots are digested once for both passes (votes and mean gradient).
    if (cache_inputs_.empty())
      cache_inputs_ = statistics_inputs(model_, weights_, data_.shots, context_, job_.head.empty() ? "" : "head " + file_digest(job_.head) + "\n");
    const StatisticsKey key = statistics_key(cache_inputs_, mode, options.method, options.precision);
    if (auto cached = cache.read(key, weights_, data_.shots.samples, context_)) {
      ++cache_hits_;
      count_progress(data_.shots.samples);
      if (context_.is_root()) cache_log_ << "transport: " << sign_mode_name(mode) << " statistics read from " << cache.path(key) << "\n";
      return std::move(*cached);
    }
    ++cache_misses_;
    const ShardedStatistics statistics = sharded_statistics(model_, weights_, data_.shots, options, context_, device_);
    cache.write(key, weights_, statistics, mode, model_.model_type(), context_);
    if (context_.is_root()) cache_log_ << "transport: " << sign_mode_name(mode) << " statistics computed, kept in " << cache.path(key) << "\n";
    return statistics.to_f32();
  }
  // Statistics read from the cache and computed, and what was said about each.
  long long cache_hits() const { return cache_hits_; }
  long long cache_misses() const { return cache_misses_; }
  std::string cache_log() const { return cache_log_.str(); }

  ParameterVector mean_gradient(const ParameterVector* mean_statistics) override {
    ParameterVector gradient = mean_statistics != nullptr ? *mean_statistics : statistics(SignMode::kMean);
    const auto scale = static_cast<float>(-1.0 / static_cast<double>(data_.shots.samples));
    for (auto& piece : gradient)
      for (auto& value : piece) value *= scale;
    return gradient;
  }

  ParameterVector mask(MaskMode mode, const MaskOptions& options, const ParameterVector& tau, const ParameterVector& statistics) override {
    return mask_pieces(weights_.layout(), weights_.plan(), context_, mode, options, tau, statistics);
  }

  PairStats compare(const ParameterVector& a, const ParameterVector& b) override { return pair_stats(a, b, context_); }
  double dot(const ParameterVector& a, const ParameterVector& b) override { return directional_derivative(a, b, context_); }

  Score score(const ParameterVector* delta, double alpha, Split split) override {
    const SampleSource& data = split == Split::kShots ? data_.shots : split == Split::kSupport ? data_.support : data_.test;
    weights_.set_offset(delta, static_cast<float>(alpha));
    const Score result = gradfix::score(model_, weights_, data, context_, device_);
    weights_.set_offset(nullptr, 0.0f);
    return result;
  }

  std::vector<TransportRow> finetune_rows(const ParameterVector& gradient, const FinetuneStart& start) override {
    FinetuneChoice& choice = start.delta == nullptr ? finetuned_ : gradfix_finetuned_;
    choice = FinetuneChoice{};
    Pieces begin;
    if (start.delta != nullptr) {
      begin = *start.delta;
      for (auto& piece : begin)
        for (auto& value : piece) value *= static_cast<float>(start.alpha);
    }
    const Pieces update = sharded_finetune(model_, weights_, data_.shots, data_.support, finetune_lrs(), finetune_steps(), context_, device_,
                                           start.delta == nullptr ? nullptr : &begin, choice);
    const Score test = score(&update, 1.0, Split::kTest);
    TransportRow row = make_transport_row(start.label, test.accuracy, test.loss, -1, -1, -1);
    row.directional_derivative = dot(gradient, update);
    row.forward_samples = choice.forward_samples;
    row.backward_samples = choice.backward_samples;
    return {row};
  }
  long long shot_count() const override { return data_.shots.samples; }
  long long support_count() const override { return data_.support.samples; }

  std::optional<Score> target_finetuned_score() override {
    if (job_.target_finetuned.empty()) return std::nullopt;
    std::unique_ptr<ShardedWeights> upper;
    context_.agree([&] { upper = std::make_unique<ShardedWeights>(model_.layout(), job_.target_finetuned, context_); });
    return gradfix::score(model_, *upper, data_.test, context_, device_);
  }

 private:
  const TransportJob& job_;
  const LayeredModel& model_;
  ShardedWeights& weights_;
  const ShardedTransportData& data_;
  const torch::Device& device_;
  const JobContext& context_;
  FinetuneChoice finetuned_;          // from B
  FinetuneChoice gradfix_finetuned_;  // from GradFix's transported model
  std::string cache_inputs_;  // statistics_inputs, once computed
  long long cache_hits_ = 0, cache_misses_ = 0;
  std::ostringstream cache_log_;
};

}  // namespace

// The shots and the support set of a pool: the shots as every job draws them (shots.hpp: an
// indices file, the first N of a shuffle seeded by --seed, or K per class by --selection); the
// support set is the next --support-size samples of that shuffle, disjoint from the shots.
void split_pool(const ShotPool& pool, const TransportJob& job, std::vector<long long>& shots, std::vector<long long>& support) {
  const long long samples = pool.samples;
  const std::vector<long long> order = shuffled_indices(samples, job.seed);
  shots = choose_shots(pool, job.selection, job.shots_per_class, job.num_samples, job.seed, true);
  std::vector<char> taken(static_cast<std::size_t>(samples), 0);
  for (long long i : shots) taken[static_cast<std::size_t>(i)] = 1;
  for (long long i : order)
    if (!taken[static_cast<std::size_t>(i)] && static_cast<long long>(support.size()) < job.support_size) support.push_back(i);
  if (support.empty()) throw InputError(job.data.spec + ": no samples are left for the support set after the shots");
}

namespace {

// The task vector (or the source pair) and B's fine-tune must be tensors of this model: checked
// before any is read.
void check_transport_inputs(const TransportJob& job, const LayeredModel& model, const JobContext& context) {
  context.agree([&] {
    // The task vector and B's fine-tune must be tensors of this model: checked before any is read.
    if (!job.task_vector.empty()) {
      check_against_model(*open_reader(job.task_vector), model, true);
    } else if (!job.source_base.empty() && !job.source_finetuned.empty()) {
      check_against_model(*open_reader(job.source_base), model, false);
      check_against_model(*open_reader(job.source_finetuned), model, false);
    } else {
      throw InputError("transport needs --task-vector, or --source-base and --source-finetuned");
    }
    if (!job.target_finetuned.empty()) check_against_model(*open_reader(job.target_finetuned), model, false);
  });
}

// Every rank's pieces of B, tau and (with B_ft) tau_B; nothing whole.
struct ShardedVectors {
  std::unique_ptr<ShardedWeights> weights;
  Pieces tau;
  Pieces tau_b;  // empty without B_ft
};

ShardedVectors read_transport_vectors(const TransportJob& job, const LayeredModel& model, const JobContext& context) {
  ShardedVectors out;
  context.agree([&] {
    out.weights = std::make_unique<ShardedWeights>(model.layout(), model.directory(), context);
    const auto& layout = out.weights->layout();
    const auto& plan = out.weights->plan();
    if (!job.task_vector.empty())
      out.tau = read_pieces(*open_reader(job.task_vector), layout, plan, context.rank());
    else
      out.tau = difference(read_pieces(*open_reader(job.source_finetuned), layout, plan, context.rank()),
                       read_pieces(*open_reader(job.source_base), layout, plan, context.rank()));
    if (!job.target_finetuned.empty())
      out.tau_b = difference(read_pieces(*open_reader(job.target_finetuned), layout, plan, context.rank()), out.weights->pieces());
  });
  return out;
}

}  // namespace

// B + alpha * delta, piece by piece, in B's dtypes and format, with B's model files. B's tensors
// outside the model's layout (a CLIP text tower, a tied head stored anyway) are copied as they
// are, so that the output is the whole model again.
void write_moved_model(const std::string& source, const std::string& out, const ShardedWeights& weights, const Pieces& delta, double alpha,
                       const Metadata& extra, const JobContext& context) {
  std::unique_ptr<TensorReader> base;
  std::vector<TensorInfo> layout = weights.layout();
  const std::size_t transported_count = layout.size();
  Metadata metadata;
  context.agree([&] {
    base = open_reader(source);
    for (auto& tensor : layout) tensor.dtype = base->info(tensor.name).dtype;
    std::set<std::string> names;
    for (const auto& tensor : layout) names.insert(tensor.name);
    for (const auto& tensor : base->tensors())
      if (!names.count(tensor.name)) layout.push_back(tensor);
    metadata = base->metadata();
  });
  for (const auto& [key, value] : extra) metadata[key] = value;
  auto writer = open_collective_writer(context, out, layout, metadata);
  context.agree([&] {
    const auto& pieces = weights.plan().pieces(context.rank());
    const auto scale = static_cast<float>(alpha);
    for (std::size_t k = 0; k < pieces.size(); ++k) {
      std::vector<float> values = weights.pieces()[k];
      for (std::size_t i = 0; i < values.size(); ++i) values[i] += scale * delta[k][i];
      writer->write_f32(layout[pieces[k].tensor].name, pieces[k].begin, values.data(), pieces[k].count);
    }
    if (!context.is_root()) return;
    constexpr long long kBlock = 1LL << 22;  // bytes per copied block
    std::vector<unsigned char> block;
    for (std::size_t t = transported_count; t < layout.size(); ++t) {
      const TensorInfo& tensor = layout[t];
      const long long step = std::max<long long>(1, kBlock / static_cast<long long>(dtype_size(tensor.dtype)));
      for (long long begin = 0; begin < tensor.numel(); begin += step) {
        const long long count = std::min(step, tensor.numel() - begin);
        block.resize(static_cast<std::size_t>(count) * dtype_size(tensor.dtype));
        base->read_raw(tensor.name, begin, count, block.data());
        writer->write_raw(tensor.name, begin, count, block.data());
      }
    }
  });
  carry_model_files(context, source, *writer, OutputOptions{}, metadata);
  commit_collectively(context, *writer);
}

namespace {

void write_transported_model(const TransportJob& job, const ShardedWeights& weights, const TransportOutcome& outcome, long long shots,
                             std::ostream& log, const JobContext& context) {
  Metadata metadata;
  metadata["gradfix.operation"] = "transport";
  metadata["gradfix.alpha"] = format_number(outcome.gradfix_alpha);
  metadata["gradfix.sign_mode"] = sign_mode_name(job.sign_mode);
  metadata["gradfix.mask_mode"] = mask_mode_name(job.mask_mode);
  metadata["gradfix.samples"] = std::to_string(shots);
  write_moved_model(job.target, job.out, weights, outcome.masked, outcome.gradfix_alpha, metadata, context);
  if (context.is_root()) log << "transport: GradFix model (alpha " << outcome.gradfix_alpha << ") written to " << job.out << "\n";
}

void write_transport_results(const TransportJob& job, const LayeredModel& model, const ShardedTransportData& data,
                             const TransportRecipe& recipe, const ShardedTarget& target, const std::vector<TransportRow>& rows,
                             std::ostream& log, const JobContext& context) {
  const std::vector<double>& alphas = recipe.alpha.grid;
  const FinetuneChoice& finetuned = target.finetune_choice();
  const std::vector<double> finetune_lrs = target.finetune_lrs();
  const std::vector<long long> finetune_steps = target.finetune_steps();
  context.agree([&] {
    if (!context.is_root()) return;
    nlohmann::json results = {{"model_type", model.model_type()}, {"shots", data.shots.samples},
                               {"support_samples", data.support.samples}, {"test_samples", data.test.samples},
                               {"seed", job.seed}, {"selection", job.selection.strategy}, {"sign_mode", sign_mode_name(job.sign_mode)},
                               {"mask_mode", mask_mode_name(job.mask_mode)}, {"alphas", alphas},
                               {"alpha_chosen_by", recipe.alpha.description()}, {"metric", data.metric_json},
                               {"rows", transport_rows_json(rows)}};
    add_derivative_summary(rows, results);
    if (!job.statistics_cache.empty())
      results["statistics_cache"] = {{"directory", job.statistics_cache}, {"hits", target.cache_hits()}, {"misses", target.cache_misses()}};
    if (job.few_shot_baseline)
      results["few_shot_finetuning"] = {{"optimizer", "adam"}, {"learning_rates", finetune_lrs}, {"step_counts", finetune_steps},
                                        {"chosen_by", "support mean loss"}, {"learning_rate", finetuned.lr},
                                        {"steps", finetuned.steps}, {"support_loss", finetuned.support_loss}};
    if (job.few_shot_baseline && job.gradfix_finetune) {
      const FinetuneChoice& chosen = target.gradfix_finetune_choice();
      results["gradfix_finetuning"] = {{"start", "B + alpha * masked tau at GradFix's alpha"}, {"learning_rate", chosen.lr},
                                       {"steps", chosen.steps}, {"support_loss", chosen.support_loss}};
    }
    write_text_file_atomically(job.results, results.dump(2) + "\n");
  });
  if (context.is_root()) log << "transport: results written to " << job.results << "\n";
}

}  // namespace

std::vector<TransportRow> run_sharded_transport(const TransportJob& job, const LayeredModel& model, const ShardedTransportData& data,
                                               const torch::Device& device, std::ostream& log, const JobContext& context) {
  check_transport_inputs(job, model, context);
  const ShardedVectors vectors = read_transport_vectors(job, model, context);
  ShardedTarget target(job, model, *vectors.weights, data, device, context);
  const TransportRecipe recipe = transport_recipe(job, AlphaPolicy::Metric::kSupportLoss);
  Progress progress(context, "transport",
                    transport_sample_passes(job.sign_mode, data.shots.samples, data.support.samples, data.test.samples, recipe.alpha.grid.size(),
                                            !vectors.tau_b.empty(), job.few_shot_baseline ? target.finetune_lrs().size() : 0,
                                            target.finetune_steps(), !job.target_finetuned.empty(), job.gradfix_finetune ? 2 : 1),
                    0, "samples");
  std::optional<CurrentProgress> current(progress);
  const TransportOutcome outcome = run_transport_recipe(target, vectors.tau, vectors.tau_b.empty() ? nullptr : &vectors.tau_b, recipe);
  current.reset();
  progress.finish();
  if (context.is_root()) {
    const FinetuneChoice& finetuned = target.finetune_choice();
    log << "transport: " << model.model_type() << ", " << data.shots.samples << " shots, " << data.support.samples << " support samples, "
        << data.test.samples << " test samples; alpha chosen on the support set's mean loss; parameters sharded over " << context.size()
        << " rank(s)\n";
    log << target.cache_log();
    print_transport_rows(outcome.rows, log, data.metric.c_str());
    if (job.few_shot_baseline)
      log << "transport: few-shot fine-tuning: Adam, full batch on the shots, learning rate " << finetuned.lr << " and " << finetuned.steps
          << " steps chosen on the support set's mean loss (" << finetuned.support_loss << ")\n";
    if (job.few_shot_baseline && job.gradfix_finetune) {
      const FinetuneChoice& chosen = target.gradfix_finetune_choice();
      log << "transport: the same from GradFix's model: learning rate " << chosen.lr << " and " << chosen.steps << " steps (support loss "
          << chosen.support_loss << ")\n";
    }
  }
  if (!job.out.empty()) write_transported_model(job, *vectors.weights, outcome, data.shots.samples, log, context);
  if (!job.results.empty()) write_transport_results(job, model, data, recipe, target, outcome.rows, log, context);
  return outcome.rows;
}

}  // namespace gradfix
