#include "decoder_jobs.hpp"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>

#include "classifier.hpp"
#include "decoder.hpp"
#include "gradfix/data/dataset.hpp"
#include "gradfix/dist/collective_output.hpp"
#include "sharded_executor.hpp"
#include "gradfix/comm/backend.hpp"
#include "gradfix/core/error.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/mask/compare.hpp"
#include "gradfix/mask/mask.hpp"
#include "gradfix/pipeline/jobs.hpp"
#include "transport_rows.hpp"

namespace gradfix {
namespace {

// --transform and --model belong to the image classifiers: with a decoder directory they would
// silently mean nothing.
void refuse_image_options(const std::string& model, const DataOptions& data) {
  if (data.transform != "none")
    throw InputError("--transform " + data.transform + " applies to image data, not to the token data of a decoder");
  if (!model.empty() && model != "builtin")
    throw InputError("--model " + model + ": a Hugging Face model directory names its architecture in config.json");
}

// What eval and signs read first: the config, the checkpoint checked against it, the token data
// checked against the vocabulary, and the device.
void load_decoder_inputs(const std::string& model, const std::string& weights, const DataOptions& data_options, const JobContext& context,
                         DecoderConfig& config, TokenData& data, torch::Device& device) {
  refuse_image_options(model, data_options);
  config = read_decoder_config(weights);
  check_decoder_checkpoint(config);
  data = load_token_data(data_options.spec);
  check_vocabulary(data, config.vocab_size);
  device = parse_device(context.device, context.local_rank);
}


using Pieces = std::vector<std::vector<float>>;

struct Score {
  double loss = 0.0;      // mean over samples of the per-sample mean token loss
  double accuracy = 0.0;  // next-token accuracy over all target tokens
};

// The weights as they are gathered now (with their offset) on `data`. A non-finite loss is
// reported, not refused: an alpha that overshoots is a grid point to pass over.
Score score(const Decoder& decoder, const ShardedWeights& weights, const TokenData& data, const JobContext& context,
            const torch::Device& device) {
  const ShardedEvaluation evaluation = sharded_evaluation(decoder, weights, token_samples(data), context, device, false);
  Score result;
  for (double loss : evaluation.losses) result.loss += loss;
  result.loss /= static_cast<double>(evaluation.losses.size());
  result.accuracy = static_cast<double>(evaluation.hits) / static_cast<double>(std::max(1LL, evaluation.targets));
  return result;
}

// The alpha of the grid with the lowest mean loss of B + alpha * delta on the support set (ties:
// the earlier in the grid); a grid point whose loss is not finite is never chosen. The test set
// plays no part.
double choose_alpha(const Decoder& decoder, ShardedWeights& weights, const Pieces& delta, const std::vector<double>& alphas,
                    const TokenData& support, const JobContext& context, const torch::Device& device) {
  double best_alpha = 0.0, best_loss = std::numeric_limits<double>::infinity();
  bool found = false;
  for (double alpha : alphas) {
    weights.set_offset(&delta, static_cast<float>(alpha));
    const double loss = score(decoder, weights, support, context, device).loss;
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

Pieces difference(const Pieces& a, const Pieces& b) {
  Pieces out = a;
  for (std::size_t k = 0; k < out.size(); ++k)
    for (std::size_t i = 0; i < out[k].size(); ++i) out[k][i] -= b[k][i];
  return out;
}

// The shots (the first N of a seeded shuffle of the pool, or an indices file: what `signs`
// takes) and the support set (the next samples of the same shuffle, disjoint from the shots).
void split_pool(const TokenData& pool, const TransportJob& job, std::vector<long long>& shots, std::vector<long long>& support) {
  if (job.selection.num_batches > 0) throw InputError("--num-batches is for image data; use --num-samples or --indices with token data");
  const std::vector<long long> order = shuffled_indices(pool.samples, job.seed);
  if (!job.selection.indices_file.empty()) {
    shots = read_indices(job.selection.indices_file, pool.samples);
  } else if (job.num_samples > 0) {
    if (job.num_samples >= pool.samples)
      throw InputError(job.data.spec + ": --num-samples " + std::to_string(job.num_samples) + " but the pool holds " +
                       std::to_string(pool.samples) + " samples and the support set needs some of them");
    shots.assign(order.begin(), order.begin() + job.num_samples);
  } else {
    throw InputError("transport of a decoder takes its shots with --num-samples N (the first N of a shuffle with --seed) or --indices FILE");
  }
  std::vector<char> taken(static_cast<std::size_t>(pool.samples), 0);
  for (long long i : shots) taken[static_cast<std::size_t>(i)] = 1;
  for (long long i : order)
    if (!taken[static_cast<std::size_t>(i)] && static_cast<long long>(support.size()) < job.support_size) support.push_back(i);
  if (support.empty()) throw InputError(job.data.spec + ": no samples are left for the support set after the shots");
}

}  // namespace

void run_decoder_eval(const EvalJob& job, std::ostream& log, const JobContext& context) {
  DecoderConfig config;
  TokenData data;
  torch::Device device = torch::kCPU;
  context.agree([&] { load_decoder_inputs(job.model, job.weights, job.data, context, config, data, device); });
  // The parameters stay sharded: each rank reads its pieces, layers are gathered one at a time.
  std::unique_ptr<ShardedWeights> weights;
  context.agree([&] { weights = std::make_unique<ShardedWeights>(decoder_layout(config), config.directory, context); });
  const Decoder decoder(config);
  const ShardedEvaluation evaluation = sharded_evaluation(decoder, *weights, token_samples(data), context, device);
  const std::vector<double>& losses = evaluation.losses;
  double mean = 0.0;
  for (double loss : losses) mean += loss;
  mean /= static_cast<double>(losses.size());
  const double accuracy = static_cast<double>(evaluation.hits) / static_cast<double>(std::max(1LL, evaluation.targets));
  if (!job.results.empty())
    context.agree([&] {
      if (context.is_root())
        write_text_file_atomically(job.results, nlohmann::json{{"model_type", config.model_type}, {"samples", data.samples},
                                                          {"target_tokens", evaluation.targets}, {"mean_loss", mean},
                                                          {"token_accuracy", accuracy}, {"per_sample_loss", losses}}.dump(2) + "\n");
    });
  if (!context.is_root()) return;
  log << "eval: " << config.model_type << ", " << data.samples << " samples, " << evaluation.targets << " target tokens, mean loss "
      << std::fixed << std::setprecision(4) << mean << ", token accuracy " << std::setprecision(2) << 100.0 * accuracy << "%"
      << (job.results.empty() ? "" : ", results in " + job.results) << ", parameters sharded over " << context.size() << " rank(s)\n";
  log.unsetf(std::ios::fixed);
}

void run_decoder_init(const InitJob& job, std::ostream& log, const JobContext& context) {
  DecoderConfig config;
  std::string text;
  double scale = 0.02;
  context.agree([&] {
    text = read_config_text(job.config);
    config = parse_decoder_config(text, job.config);
    if (config.model_type != job.arch)
      throw InputError(job.config + ": \"model_type\" is \"" + config.model_type + "\" but --arch is " + job.arch);
    const auto parsed = nlohmann::json::parse(text, nullptr, false, false);
    if (parsed.contains("initializer_range") && parsed.at("initializer_range").is_number()) scale = parsed.at("initializer_range").get<double>();
    if (!(scale > 0.0) || !std::isfinite(scale)) throw InputError(job.config + ": \"initializer_range\" must be positive");
    if (format_of_path(job.out) != StoreFormat::kShardedSafetensors)
      throw InputError("--out " + job.out + ": a decoder is written as a Hugging Face model directory (a path without an extension)");
  });
  // The root writes the directory, weights and config.json, and publishes it in one step.
  std::unique_ptr<TensorWriter> writer;
  long long parameters = 0;
  context.agree([&] {
    if (!context.is_root()) return;
    const std::vector<TensorInfo> layout = decoder_layout(config);
    writer = open_writer(job.out, layout, {{"format", "pt"}, {"gradfix.operation", "init"}, {"gradfix.seed", std::to_string(job.seed)}});
    for (std::size_t i = 0; i < layout.size(); ++i) {
      const TensorInfo& tensor = layout[i];
      const std::vector<int64_t> shape(tensor.shape.begin(), tensor.shape.end());
      torch::Tensor values;
      const bool norm = tensor.name.find("norm") != std::string::npos, bias = tensor.name.size() > 5 && tensor.name.compare(tensor.name.size() - 5, 5, ".bias") == 0;
      if (norm) {
        values = torch::ones(shape);
      } else if (bias) {
        values = torch::zeros(shape);
      } else {
        // Seeded by the tensor's place, so the weights do not depend on anything else.
        torch::manual_seed(job.seed * 1000003ULL + i);
        values = torch::randn(shape) * scale;
      }
      values = values.contiguous();
      writer->write_f32(tensor.name, 0, values.data_ptr<float>(), tensor.numel());
      parameters += tensor.numel();
    }
    writer->add_file("config.json", nlohmann::json::parse(text).dump(2) + "\n");
    writer->finish();
  });
  if (writer) {
    writer->publish();
    log << "init: " << config.model_type << ", " << config.layers << " layers, hidden " << config.hidden_size << ", " << parameters
        << " parameters, seed " << job.seed << ", written to " << job.out << "/ (config.json and safetensors)\n";
  }
}

void run_decoder_signs(const SignsJob& job, std::ostream& log, const JobContext& context) {
  DecoderConfig config;
  TokenData shots;
  torch::Device device = torch::kCPU;
  context.agree([&] {
    if (job.selection.num_batches > 0) throw InputError("--num-batches is for image data; use --num-samples or --indices with token data");
    TokenData data;
    load_decoder_inputs(job.model, job.weights, job.data, context, config, data, device);
    // The shots: an indices file, the first N of a seeded shuffle, or every sample.
    std::vector<long long> chosen;
    if (!job.selection.indices_file.empty()) {
      chosen = read_indices(job.selection.indices_file, data.samples);
    } else if (job.num_samples > 0) {
      if (job.num_samples > data.samples)
        throw InputError(job.data.spec + ": --num-samples " + std::to_string(job.num_samples) + " but the file holds " +
                         std::to_string(data.samples) + " samples");
      const auto order = shuffled_indices(data.samples, job.seed);
      chosen.assign(order.begin(), order.begin() + job.num_samples);
    } else {
      chosen = shuffled_indices(data.samples, job.seed);
      std::sort(chosen.begin(), chosen.end());
    }
    shots = data.subset(chosen);
  });
  std::unique_ptr<ShardedWeights> weights;
  context.agree([&] { weights = std::make_unique<ShardedWeights>(decoder_layout(config), config.directory, context); });
  const Decoder decoder(config);
  ShardedSignsOptions options;
  options.sign_mode = job.sign_mode;
  options.method = job.method;
  const ShardedStatistics statistics = sharded_statistics(decoder, *weights, token_samples(shots), options, context, device);

  const DType dtype = write_sharded_statistics(context, *weights, statistics, job.sign_mode, job.seed, config.model_type, job.out);
  if (context.is_root())
    log << "signs " << sign_mode_name(job.sign_mode) << ": " << config.model_type << ", " << shots.samples << " samples, "
        << weights->layout().size() << " tensors as " << dtype_name(dtype) << ", parameters sharded over " << context.size()
        << " rank(s), written to " << job.out << "\n";
}

std::vector<TransportRow> run_decoder_transport(const TransportJob& job, std::ostream& log, const JobContext& context) {
  DecoderConfig config;
  TokenData pool, test, shots, support;
  torch::Device device = torch::kCPU;
  context.agree([&] {
    load_decoder_inputs(job.model, job.target, job.data, context, config, pool, device);
    refuse_image_options(job.model, job.test);
    if (job.test.spec.empty()) throw InputError("transport needs --test-data: token data read only for the final evaluation");
    test = load_token_data(job.test.spec);
    check_vocabulary(test, config.vocab_size);
    std::vector<long long> shot_indices, support_indices;
    split_pool(pool, job, shot_indices, support_indices);
    shots = pool.subset(shot_indices);
    support = pool.subset(support_indices);
    // The task vector and B's fine-tune must be tensors of this model: checked before any is read.
    if (!job.task_vector.empty()) {
      check_against_decoder(*open_reader(job.task_vector), config, true);
    } else if (!job.source_base.empty() && !job.source_finetuned.empty()) {
      check_against_decoder(*open_reader(job.source_base), config, false);
      check_against_decoder(*open_reader(job.source_finetuned), config, false);
    } else {
      throw InputError("transport needs --task-vector, or --source-base and --source-finetuned");
    }
    if (!job.target_finetuned.empty()) check_against_decoder(*open_reader(job.target_finetuned), config, false);
  });
  // Every rank holds its pieces of B, tau and (with B_ft) tau_B; nothing whole.
  std::unique_ptr<ShardedWeights> weights;
  Pieces tau, tau_b;
  context.agree([&] {
    weights = std::make_unique<ShardedWeights>(decoder_layout(config), config.directory, context);
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
  const Decoder decoder(config);
  const std::vector<double> alphas = job.alphas.empty() ? std::vector<double>{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0} : job.alphas;

  std::vector<TransportRow> rows;
  auto add_row = [&](const std::string& method, const Score& result, double alpha, double kept, double agreement) {
    rows.push_back({method, result.accuracy, result.loss, alpha, kept, agreement});
  };
  auto test_with = [&](const Pieces* delta, double alpha) {
    weights->set_offset(delta, static_cast<float>(alpha));
    const Score result = score(decoder, *weights, test, context, device);
    weights->set_offset(nullptr, 0.0f);
    return result;
  };
  add_row("B zero-shot", test_with(nullptr, 0.0), -1, -1, -1);
  const double naive_alpha = choose_alpha(decoder, *weights, tau, alphas, support, context, device);
  add_row("B + alpha tau_A (naive)", test_with(&tau, naive_alpha), naive_alpha, 1.0, -1);

  ShardedSignsOptions options;
  options.sign_mode = job.sign_mode;
  Pieces masked;
  double agreement = -1.0;
  {
    const ShardedStatistics statistics = sharded_statistics(decoder, *weights, token_samples(shots), options, context, device);
    const Pieces values = statistics.to_f32();
    masked = mask_pieces(weights->layout(), weights->plan(), context, job.mask_mode, job.mask, tau, values);
    if (!tau_b.empty()) agreement = pair_stats(values, tau_b, context).sign_agreement();
  }
  const PairStats kept = pair_stats(masked, tau, context);
  const double kept_fraction = kept.nonzero_b > 0 ? static_cast<double>(kept.nonzero_a) / static_cast<double>(kept.nonzero_b) : 0.0;
  const double gradfix_alpha = choose_alpha(decoder, *weights, masked, alphas, support, context, device);
  add_row(std::string("GradFix (") + sign_mode_name(job.sign_mode) + ", " + mask_mode_name(job.mask_mode) + ")",
          test_with(&masked, gradfix_alpha), gradfix_alpha, kept_fraction, agreement);

  if (!tau_b.empty()) {
    const Pieces oracle = mask_pieces(weights->layout(), weights->plan(), context, MaskMode::kOracle, job.mask, tau, tau_b);
    const PairStats oracle_kept = pair_stats(oracle, tau, context);
    const double oracle_alpha = choose_alpha(decoder, *weights, oracle, alphas, support, context, device);
    add_row("oracle mask sign(tau_B)", test_with(&oracle, oracle_alpha), oracle_alpha,
            static_cast<double>(oracle_kept.nonzero_a) / static_cast<double>(std::max(1LL, oracle_kept.nonzero_b)), 1.0);
    std::unique_ptr<ShardedWeights> upper;
    context.agree([&] { upper = std::make_unique<ShardedWeights>(decoder_layout(config), job.target_finetuned, context); });
    add_row("B fine-tuned (upper bound)", score(decoder, *upper, test, context, device), -1, -1, -1);
  }
  if (context.is_root()) {
    log << "transport: " << config.model_type << ", " << shots.samples << " shots, " << support.samples << " support samples, "
        << test.samples << " test samples; alpha chosen on the support set's mean loss; parameters sharded over " << context.size()
        << " rank(s)\n";
    print_transport_rows(rows, log, "test tok acc");
    if (job.few_shot_baseline) log << "transport: the few-shot fine-tuning baseline is not run for decoders (no sharded optimiser)\n";
  }

  if (!job.out.empty()) {
    // B + alpha * masked tau, piece by piece, in B's dtypes and format, with B's model files.
    std::unique_ptr<TensorReader> base;
    std::vector<TensorInfo> layout = weights->layout();
    Metadata metadata;
    context.agree([&] {
      base = open_reader(job.target);
      for (auto& tensor : layout) tensor.dtype = base->info(tensor.name).dtype;
      metadata = base->metadata();
    });
    metadata["gradfix.operation"] = "transport";
    metadata["gradfix.alpha"] = std::to_string(gradfix_alpha);
    metadata["gradfix.sign_mode"] = sign_mode_name(job.sign_mode);
    metadata["gradfix.mask_mode"] = mask_mode_name(job.mask_mode);
    metadata["gradfix.samples"] = std::to_string(shots.samples);
    auto writer = open_collective_writer(context, job.out, layout, metadata);
    context.agree([&] {
      const auto& pieces = weights->plan().pieces(context.rank());
      const auto alpha = static_cast<float>(gradfix_alpha);
      for (std::size_t k = 0; k < pieces.size(); ++k) {
        std::vector<float> values = weights->pieces()[k];
        for (std::size_t i = 0; i < values.size(); ++i) values[i] += alpha * masked[k][i];
        writer->write_f32(layout[pieces[k].tensor].name, pieces[k].begin, values.data(), pieces[k].count);
      }
    });
    carry_model_files(context, job.target, *writer, OutputOptions{});
    commit_collectively(context, *writer);
    if (context.is_root()) log << "transport: GradFix model (alpha " << gradfix_alpha << ") written to " << job.out << "\n";
  }
  if (!job.results.empty()) {
    context.agree([&] {
      if (!context.is_root()) return;
      write_text_file_atomically(job.results, nlohmann::json{{"model_type", config.model_type}, {"shots", shots.samples},
                                                        {"support_samples", support.samples}, {"test_samples", test.samples},
                                                        {"seed", job.seed}, {"sign_mode", sign_mode_name(job.sign_mode)},
                                                        {"mask_mode", mask_mode_name(job.mask_mode)}, {"alphas", alphas},
                                                        {"alpha_chosen_by", "support mean loss"}, {"metric", "token_accuracy"},
                                                        {"rows", transport_rows_json(rows)}}.dump(2) + "\n");
    });
    if (context.is_root()) log << "transport: results written to " << job.results << "\n";
  }
  return rows;
}

}  // namespace gradfix
