#include "sharded_transport.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <nlohmann/json.hpp>

#include "gradfix/comm/backend.hpp"
#include "gradfix/core/error.hpp"
#include "gradfix/core/exact_sum.hpp"
#include "gradfix/data/dataset.hpp"
#include "gradfix/dist/collective_output.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/mask/compare.hpp"
#include "gradfix/mask/mask.hpp"
#include "gradfix/pipeline/jobs.hpp"
#include "sharded_executor.hpp"
#include "shots.hpp"
#include "transport_rows.hpp"

namespace gradfix {
namespace {

using Pieces = std::vector<std::vector<float>>;

struct Score {
  double loss = 0.0;      // mean over samples of the per-sample loss
  double accuracy = 0.0;  // correct predictions over counted targets (tokens or samples)
};

// The weights as they are gathered now (with their offset) on `data`. A non-finite loss is
// reported, not refused: an alpha that overshoots is a grid point to pass over.
Score score(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data, const JobContext& context,
            const torch::Device& device) {
  const ShardedEvaluation evaluation = sharded_evaluation(model, weights, data, context, device, false);
  Score result;
  for (double loss : evaluation.losses) result.loss += loss;
  result.loss /= static_cast<double>(evaluation.losses.size());
  result.accuracy = static_cast<double>(evaluation.hits) / static_cast<double>(std::max(1LL, evaluation.targets));
  return result;
}

// The alpha of the grid with the lowest mean loss of B + alpha * delta on the support set (ties:
// the earlier in the grid); a grid point whose loss is not finite is never chosen. The test set
// plays no part. `curve` gets every grid point's support loss and accuracy and the shots' own loss.
double choose_alpha(const LayeredModel& model, ShardedWeights& weights, const Pieces& delta, const std::vector<double>& alphas,
                    const SampleSource& support, const SampleSource& shots, const JobContext& context, const torch::Device& device,
                    std::vector<AlphaPoint>& curve) {
  double best_alpha = 0.0, best_loss = std::numeric_limits<double>::infinity();
  bool found = false;
  curve.clear();
  for (double alpha : alphas) {
    weights.set_offset(&delta, static_cast<float>(alpha));
    const Score on_support = score(model, weights, support, context, device);
    const double loss = on_support.loss;
    // The support accuracy is reported (CLIP's accuracy, a decoder's next-token accuracy), not chosen by.
    curve.push_back({alpha, loss, score(model, weights, shots, context, device).loss, on_support.accuracy});
    if (std::isfinite(loss) && loss < best_loss) {
      best_loss = loss;
      best_alpha = alpha;
      found = true;
    }
  }
  weights.set_offset(nullptr, 0.0f);
  if (!found) throw InputError("every alpha of the grid gives a non-finite loss on the support set; try smaller alphas");
  return best_alpha;
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
};

// Few-shot fine-tuning of B with the parameters sharded: full-batch Adam on the shots (the mean
// cross-entropy, as torch.optim.Adam with its defaults would take it), one run per learning rate,
// the support set scored after each step count of the grid; the (learning rate, steps) with the
// lowest support mean loss wins, the same rule that chooses alpha. Each rank updates only its own
// pieces: the gradient is the mean-mode statistic (summed -gradients, reduced over the ranks like
// the votes), and the Adam moments live beside the pieces, so the optimiser's memory is sharded
// too (the update, two moments and the best update so far: four float32 copies of a rank's
// pieces). Returns the chosen update, to be evaluated as B + 1 * update.
Pieces sharded_finetune(const LayeredModel& model, ShardedWeights& weights, const SampleSource& shots, const SampleSource& support,
                        const std::vector<double>& lrs, const std::vector<long long>& step_counts, const JobContext& context,
                        const torch::Device& device, FinetuneChoice& choice) {
  constexpr double kBeta1 = 0.9, kBeta2 = 0.999, kEpsilon = 1e-8;
  ShardedSignsOptions options;
  options.sign_mode = SignMode::kMean;
  options.refuse_nonfinite = false;
  auto zeros = [&] {
    Pieces out(weights.pieces().size());
    for (std::size_t k = 0; k < out.size(); ++k) out[k].assign(weights.pieces()[k].size(), 0.0f);
    return out;
  };
  Pieces best;
  choice.support_loss = std::numeric_limits<double>::infinity();
  for (double lr : lrs) {
    Pieces update = zeros(), first = zeros(), second = zeros();
    weights.set_offset(&update, 1.0f);
    long long done = 0;
    for (long long steps : step_counts) {
      for (; done < steps; ++done) {
        const ShardedStatistics statistics = sharded_statistics(model, weights, shots, options, context, device);
        const double scale = -1.0 / static_cast<double>(statistics.samples);  // summed -gradients -> mean gradient
        const double correct1 = 1.0 - std::pow(kBeta1, static_cast<double>(done + 1));
        const double correct2 = 1.0 - std::pow(kBeta2, static_cast<double>(done + 1));
        std::vector<float> gradient;
        for (std::size_t k = 0; k < update.size(); ++k) {
          gradient.resize(update[k].size());
          statistics.read_f32(k, 0, static_cast<long long>(gradient.size()), gradient.data());
          for (std::size_t i = 0; i < gradient.size(); ++i) {
            const double g = scale * static_cast<double>(gradient[i]);
            const double m = kBeta1 * first[k][i] + (1.0 - kBeta1) * g;
            const double v = kBeta2 * second[k][i] + (1.0 - kBeta2) * g * g;
            first[k][i] = static_cast<float>(m);
            second[k][i] = static_cast<float>(v);
            update[k][i] -= static_cast<float>(lr * (m / correct1) / (std::sqrt(v / correct2) + kEpsilon));
          }
        }
      }
      const double loss = score(model, weights, support, context, device).loss;
      if (!std::isfinite(loss)) break;  // diverged: later steps at this rate are not candidates
      if (loss < choice.support_loss) {
        choice = {lr, steps, loss};
        best = update;
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

std::vector<TransportRow> run_sharded_transport(const TransportJob& job, const LayeredModel& model, const ShardedTransportData& data,
                                               const torch::Device& device, std::ostream& log, const JobContext& context) {
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
  // Every rank holds its pieces of B, tau and (with B_ft) tau_B; nothing whole.
  std::unique_ptr<ShardedWeights> weights;
  Pieces tau, tau_b;
  context.agree([&] {
    weights = std::make_unique<ShardedWeights>(model.layout(), model.directory(), context);
    const auto& layout = weights->layout();
    const auto& plan = weights->plan();
    if (!job.task_vector.empty())
      tau = read_pieces(*open_reader(job.task_vector), layout, plan, context.rank());
    else
      tau = difference(read_pieces(*open_reader(job.source_finetuned), layout, plan, context.rank()),
                       read_pieces(*open_reader(job.source_base), layout, plan, context.rank()));
    if (!job.target_finetuned.empty())
      tau_b = difference(read_pieces(*open_reader(job.target_finetuned), layout, plan, context.rank()), weights->pieces());
  });
  const std::vector<double> alphas = job.alphas.empty() ? std::vector<double>{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0} : job.alphas;

  const std::vector<double> finetune_lrs = job.finetune_lrs.empty() ? std::vector<double>{1e-5, 3e-5, 1e-4} : job.finetune_lrs;
  const std::vector<long long> finetune_steps = job.finetune_steps.empty() ? std::vector<long long>{5, 20, 50} : job.finetune_steps;
  Progress progress(context, "transport",
                    transport_sample_passes(job.sign_mode, data.shots.samples, data.support.samples, data.test.samples, alphas.size(),
                                            !tau_b.empty(), job.few_shot_baseline ? finetune_lrs.size() : 0, finetune_steps,
                                            !job.target_finetuned.empty()),
                    0, "samples");
  std::optional<CurrentProgress> current(progress);

  std::vector<TransportRow> rows;
  auto add_row = [&](const std::string& method, const Score& result, double alpha, double kept, double agreement) {
    rows.push_back(make_transport_row(method, result.accuracy, result.loss, alpha, kept, agreement));
  };
  auto test_with = [&](const Pieces* delta, double alpha) {
    weights->set_offset(delta, static_cast<float>(alpha));
    const Score result = score(model, *weights, data.test, context, device);
    weights->set_offset(nullptr, 0.0f);
    return result;
  };
  // The few-shot statistics, and g, the mean gradient of B's loss on the shots: from the same
  // pass in mean mode (the statistics are the summed -gradients), from one more in max mode.
  ShardedSignsOptions options;
  options.sign_mode = job.sign_mode;
  Pieces masked, gradient;
  double agreement = -1.0;
  {
    const ShardedStatistics statistics = sharded_statistics(model, *weights, data.shots, options, context, device);
    const Pieces values = statistics.to_f32();
    masked = mask_pieces(weights->layout(), weights->plan(), context, job.mask_mode, job.mask, tau, values);
    if (!tau_b.empty()) agreement = pair_stats(values, tau_b, context).sign_agreement();
    if (job.sign_mode == SignMode::kMean) {
      gradient = values;
    } else {
      ShardedSignsOptions sums;
      sums.sign_mode = SignMode::kMean;
      gradient = sharded_statistics(model, *weights, data.shots, sums, context, device).to_f32();
    }
    const auto scale = static_cast<float>(-1.0 / static_cast<double>(data.shots.samples));
    for (auto& piece : gradient)
      for (auto& value : piece) value *= scale;
  }
  // A row whose alpha is searched on the support set: B + alpha * delta on the test set, with
  // <g, delta> and the alpha curve. Returns the alpha chosen.
  auto add_searched_row = [&](const std::string& method, const Pieces& delta, double kept, double sign_agreement) {
    std::vector<AlphaPoint> curve;
    const double alpha = choose_alpha(model, *weights, delta, alphas, data.support, data.shots, context, device, curve);
    add_row(method, test_with(&delta, alpha), alpha, kept, sign_agreement);
    rows.back().directional_derivative = directional_derivative(gradient, delta, context);
    rows.back().curve = curve;
    return alpha;
  };
  add_row("B zero-shot", test_with(nullptr, 0.0), -1, -1, -1);
  add_searched_row("B + alpha tau_A (naive)", tau, 1.0, -1);

  const PairStats kept = pair_stats(masked, tau, context);
  const double kept_fraction = kept.nonzero_b > 0 ? static_cast<double>(kept.nonzero_a) / static_cast<double>(kept.nonzero_b) : 0.0;
  const double gradfix_alpha = add_searched_row(std::string("GradFix (") + sign_mode_name(job.sign_mode) + ", " + mask_mode_name(job.mask_mode) + ")",
                                                masked, kept_fraction, agreement);

  FinetuneChoice finetuned;
  if (job.few_shot_baseline) {
    const Pieces update = sharded_finetune(model, *weights, data.shots, data.support, finetune_lrs, finetune_steps, context, device, finetuned);
    add_row("few-shot fine-tuning of B", test_with(&update, 1.0), -1, -1, -1);
    rows.back().directional_derivative = directional_derivative(gradient, update, context);
  }

  if (!tau_b.empty()) {
    const Pieces oracle = mask_pieces(weights->layout(), weights->plan(), context, MaskMode::kOracle, job.mask, tau, tau_b);
    const PairStats oracle_kept = pair_stats(oracle, tau, context);
    add_searched_row("oracle mask sign(tau_B)", oracle,
                     static_cast<double>(oracle_kept.nonzero_a) / static_cast<double>(std::max(1LL, oracle_kept.nonzero_b)), 1.0);
    std::unique_ptr<ShardedWeights> upper;
    context.agree([&] { upper = std::make_unique<ShardedWeights>(model.layout(), job.target_finetuned, context); });
    add_row("B fine-tuned (upper bound)", score(model, *upper, data.test, context, device), -1, -1, -1);
  }
  current.reset();
  progress.finish();
  if (context.is_root()) {
    log << "transport: " << model.model_type() << ", " << data.shots.samples << " shots, " << data.support.samples << " support samples, "
        << data.test.samples << " test samples; alpha chosen on the support set's mean loss; parameters sharded over " << context.size()
        << " rank(s)\n";
    print_transport_rows(rows, log, data.metric.c_str());
    if (job.few_shot_baseline)
      log << "transport: few-shot fine-tuning: Adam, full batch on the shots, learning rate " << finetuned.lr << " and " << finetuned.steps
          << " steps chosen on the support set's mean loss (" << finetuned.support_loss << ")\n";
  }

  if (!job.out.empty()) {
    // B + alpha * masked tau, piece by piece, in B's dtypes and format, with B's model files.
    // B's tensors outside the model's layout (a CLIP text tower, a tied head stored anyway) are
    // copied as they are, so that the output is the whole model again.
    std::unique_ptr<TensorReader> base;
    std::vector<TensorInfo> layout = weights->layout();
    const std::size_t transported_count = layout.size();
    Metadata metadata;
    context.agree([&] {
      base = open_reader(job.target);
      for (auto& tensor : layout) tensor.dtype = base->info(tensor.name).dtype;
      std::set<std::string> names;
      for (const auto& tensor : layout) names.insert(tensor.name);
      for (const auto& tensor : base->tensors())
        if (!names.count(tensor.name)) layout.push_back(tensor);
      metadata = base->metadata();
    });
    metadata["gradfix.operation"] = "transport";
    metadata["gradfix.alpha"] = std::to_string(gradfix_alpha);
    metadata["gradfix.sign_mode"] = sign_mode_name(job.sign_mode);
    metadata["gradfix.mask_mode"] = mask_mode_name(job.mask_mode);
    metadata["gradfix.samples"] = std::to_string(data.shots.samples);
    auto writer = open_collective_writer(context, job.out, layout, metadata);
    context.agree([&] {
      const auto& pieces = weights->plan().pieces(context.rank());
      const auto alpha = static_cast<float>(gradfix_alpha);
      for (std::size_t k = 0; k < pieces.size(); ++k) {
        std::vector<float> values = weights->pieces()[k];
        for (std::size_t i = 0; i < values.size(); ++i) values[i] += alpha * masked[k][i];
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
    carry_model_files(context, job.target, *writer, OutputOptions{}, metadata);
    commit_collectively(context, *writer);
    if (context.is_root()) log << "transport: GradFix model (alpha " << gradfix_alpha << ") written to " << job.out << "\n";
  }
  if (!job.results.empty()) {
    context.agree([&] {
      if (!context.is_root()) return;
      nlohmann::json results = {{"model_type", model.model_type()}, {"shots", data.shots.samples},
                                 {"support_samples", data.support.samples}, {"test_samples", data.test.samples},
                                 {"seed", job.seed}, {"selection", job.selection.strategy}, {"sign_mode", sign_mode_name(job.sign_mode)},
                                 {"mask_mode", mask_mode_name(job.mask_mode)}, {"alphas", alphas},
                                 {"alpha_chosen_by", "support mean loss"}, {"metric", data.metric_json},
                                 {"rows", transport_rows_json(rows)}};
      add_derivative_summary(rows, results);
      if (job.few_shot_baseline)
        results["few_shot_finetuning"] = {{"optimizer", "adam"}, {"learning_rates", finetune_lrs}, {"step_counts", finetune_steps},
                                          {"chosen_by", "support mean loss"}, {"learning_rate", finetuned.lr},
                                          {"steps", finetuned.steps}, {"support_loss", finetuned.support_loss}};
      write_text_file_atomically(job.results, results.dump(2) + "\n");
    });
    if (context.is_root()) log << "transport: results written to " << job.results << "\n";
  }
  return rows;
}

}  // namespace gradfix
