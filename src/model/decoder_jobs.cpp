#include "decoder_jobs.hpp"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "classifier.hpp"
#include "decoder.hpp"
#include "gradfix/io/dataset.hpp"
#include "sharded_executor.hpp"
#include "sharded_transport.hpp"
#include "shots.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/dist/progress.hpp"

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

// One line on rank 0 naming the config.json keys gradfix does not know: the job goes on taking
// them not to change the math, and the user sees which they are (--strict-config refuses them).
void notice_unknown_config_keys(const LayeredModel& model, const std::string& config_path, std::ostream& log, const JobContext& context) {
  const std::vector<std::string> keys = model.unknown_config_keys();
  if (keys.empty() || !context.is_root()) return;
  log << "notice: " << config_path << ": " << keys.size() << " key(s) gradfix does not know, taken not to change the math: "
      << format_name_list(keys) << " (--strict-config refuses them; docs/models.md lists the keys by class)\n";
}

// What eval and signs read first: the config, the checkpoint checked against it, the token data
// checked against the vocabulary, and the device.
void load_decoder_inputs(const std::string& model, const std::string& weights, const DataOptions& data_options, const JobContext& context,
                         std::unique_ptr<Decoder>& decoder, TokenData& data, torch::Device& device, std::ostream& log) {
  refuse_image_options(model, data_options);
  decoder = open_decoder(weights, context.strict_config);
  notice_unknown_config_keys(*decoder, weights + "/config.json", log, context);
  check_decoder_checkpoint(*decoder);
  data = load_token_data(data_options.spec);
  check_vocabulary(data, decoder->config().vocab_size);
  device = parse_device(context.device, context.local_rank);
}



}  // namespace

void run_decoder_eval(const EvalJob& job, std::ostream& log, const JobContext& context) {
  std::unique_ptr<Decoder> decoder;
  TokenData data;
  torch::Device device = torch::kCPU;
  context.agree([&] { load_decoder_inputs(job.model, job.weights, job.data, context, decoder, data, device, log); });
  // The parameters stay sharded: each rank reads its pieces, layers are gathered one at a time.
  std::unique_ptr<ShardedWeights> weights;
  context.agree([&] { weights = std::make_unique<ShardedWeights>(decoder->layout(), decoder->directory(), context); });
  const ShardedEvaluation evaluation = sharded_evaluation(*decoder, *weights, token_samples(data), context, device);
  const std::vector<double>& losses = evaluation.losses;
  const double mean = evaluation.mean_loss();
  const double accuracy = static_cast<double>(evaluation.hits) / static_cast<double>(std::max(1LL, evaluation.targets));
  if (!job.results.empty())
    context.agree([&] {
      if (context.is_root())
        write_text_file_atomically(job.results, nlohmann::json{{"model_type", decoder->model_type()}, {"samples", data.samples},
                                                          {"target_tokens", evaluation.targets}, {"mean_loss", mean},
                                                          {"token_accuracy", accuracy}, {"per_sample_loss", losses}}.dump(2) + "\n");
    });
  if (!context.is_root()) return;
  log << "eval: " << decoder->model_type() << ", " << data.samples << " samples, " << evaluation.targets << " target tokens, mean loss "
      << std::fixed << std::setprecision(4) << mean << ", token accuracy " << std::setprecision(2) << 100.0 * accuracy << "%"
      << (job.results.empty() ? "" : ", results in " + job.results) << ", parameters sharded over " << context.size() << " rank(s)\n";
  log.unsetf(std::ios::fixed);
}

void run_decoder_train(const TrainJob& job, std::ostream& log, const JobContext& context) {
  job.validate();
  std::unique_ptr<Decoder> decoder;
  TokenData data;
  torch::Device device = torch::kCPU;
  context.agree([&] {
    // The classifiers' options have no meaning for a decoder: refused rather than ignored.
    if (job.shots_per_class > 0 || !job.selection.indices_file.empty() || job.selection.num_batches > 0 || !job.freeze.empty())
      throw InputError("gradfix train on a model directory trains on every sample of --data (after --skip and --limit): --shots-per-class, "
                       "--indices, --num-batches and --freeze apply to the built-in classifiers");
    if (format_of_path(job.out) != StoreFormat::kShardedSafetensors)
      throw InputError("--out " + job.out + ": a trained decoder is written as a Hugging Face model directory (a path without an extension)");
    load_decoder_inputs(job.model, job.weights, job.data, context, decoder, data, device, log);
    if (job.skip < 0 || job.limit < 0) throw InputError("--skip and --limit must not be negative");
    if (job.skip >= data.samples)
      throw InputError(job.data.spec + ": --skip " + std::to_string(job.skip) + " leaves none of its " + std::to_string(data.samples) + " samples");
    const long long end = job.limit > 0 ? std::min(data.samples, job.skip + job.limit) : data.samples;
    std::vector<long long> kept;
    for (long long i = job.skip; i < end; ++i) kept.push_back(i);
    if (job.skip > 0 || end < data.samples) data = data.subset(kept);
  });
  std::unique_ptr<ShardedWeights> weights;
  context.agree([&] { weights = std::make_unique<ShardedWeights>(decoder->layout(), decoder->directory(), context); });
  const SampleSource samples = token_samples(data);
  auto mean_loss = [&] { return sharded_evaluation(*decoder, *weights, samples, context, device).mean_loss(); };
  const double before = mean_loss();
  const auto update = sharded_train(*decoder, *weights, samples, job.epochs, job.batch, job.lr, job.seed, context, device);
  weights->set_offset(&update, 1.0f);
  const double after = mean_loss();
  weights->set_offset(nullptr, 0.0f);
  const long long steps_per_epoch = (data.samples + job.batch - 1) / job.batch;
  Metadata metadata = {{"gradfix.operation", "train"}, {"gradfix.epochs", std::to_string(job.epochs)}, {"gradfix.lr", format_number(job.lr)},
                       {"gradfix.batch", std::to_string(job.batch)}, {"gradfix.seed", std::to_string(job.seed)},
                       {"gradfix.samples", std::to_string(data.samples)}};
  write_moved_model(job.weights, job.out, *weights, update, 1.0, metadata, context);
  if (context.is_root())
    log << "train: " << decoder->model_type() << ", " << data.samples << " samples, " << job.epochs << " epoch(s) of " << steps_per_epoch
        << " Adam step(s) (batch " << job.batch << ", lr " << format_number(job.lr) << "), mean loss " << std::fixed << std::setprecision(4)
        << before << " -> " << after << ", parameters sharded over " << context.size() << " rank(s), written to " << job.out << "\n";
  log.unsetf(std::ios::fixed);
}

void run_decoder_init(const InitJob& job, std::ostream& log, const JobContext& context) {
  std::unique_ptr<Decoder> decoder;
  std::string text;
  double scale = 0.02;
  context.agree([&] {
    text = read_config_text(job.config);
    const std::string type = config_model_type(text, job.config);
    if (type != job.arch) throw InputError(job.config + ": \"model_type\" is \"" + type + "\" but --arch is " + job.arch);
    decoder = decoder_from_config(text, job.config, context.strict_config);
    notice_unknown_config_keys(*decoder, job.config, log, context);
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
    const std::vector<TensorInfo> layout = decoder->layout();
    writer = open_writer(job.out, layout, {{"format", "pt"}, {"gradfix.operation", "init"}, {"gradfix.seed", std::to_string(job.seed)}});
    for (std::size_t i = 0; i < layout.size(); ++i) {
      const TensorInfo& tensor = layout[i];
      const std::vector<int64_t> shape(tensor.shape.begin(), tensor.shape.end());
      torch::Tensor values;
      const bool norm = tensor.name.find("norm") != std::string::npos, bias = tensor.name.size() > 5 && tensor.name.compare(tensor.name.size() - 5, 5, ".bias") == 0;
      if (norm) {
        values = torch::full(shape, decoder->initial_norm_scale());
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
    log << "init: " << decoder->model_type() << ", " << decoder->layers() << " layers, hidden " << decoder->config().hidden_size << ", " << parameters
        << " parameters, seed " << job.seed << ", written to " << job.out << "/ (config.json and safetensors)\n";
  }
}

void run_decoder_signs(const SignsJob& job, std::ostream& log, const JobContext& context) {
  std::unique_ptr<Decoder> model;
  TokenData data, shots;
  torch::Device device = torch::kCPU;
  context.agree([&] {
    if (job.selection.num_batches > 0) throw InputError("--num-batches is for image data; use --num-samples or --indices with token data");
    load_decoder_inputs(job.model, job.weights, job.data, context, model, data, device, log);
  });
  std::shared_ptr<ShardedWeights> weights;
  context.agree([&] { weights = std::make_shared<ShardedWeights>(model->layout(), model->directory(), context); });
  const Decoder& decoder = *model;
  context.agree([&] {
    // The shots: an indices file, the first N of a seeded shuffle (or N by --selection), or every sample.
    ShotPool pool;
    pool.samples = data.samples;
    pool.name = job.data.spec;
    // The mean of the last layer's output over each sequence's tokens, computed sharded.
    pool.model_features = sharded_feature_source(decoder, data, token_samples, weights, context, device);
    const std::vector<long long> chosen = choose_shots(pool, job.selection, 0, job.num_samples, job.seed, false);
    save_chosen_shots(job.selection, chosen, context);
    shots = data.subset(chosen);
  });
  ShardedSignsOptions options;
  options.sign_mode = job.sign_mode;
  options.method = job.method;
  options.precision = job.vote_precision;
  Progress progress(context, "signs", shots.samples, 0, "samples");
  std::optional<CurrentProgress> current(progress);
  const ShardedStatistics statistics = sharded_statistics(decoder, *weights, token_samples(shots), options, context, device);
  current.reset();
  progress.finish();

  const DType dtype = write_sharded_statistics(context, *weights, statistics, job.sign_mode, job.seed, decoder.model_type(), job.out,
                                               vote_precision_metadata(job.vote_precision));
  if (context.is_root())
    log << "signs " << sign_mode_name(job.sign_mode) << (job.vote_precision == VotePrecision::kF32 ? "" : " (bf16 products)") << ": " << decoder.model_type() << ", " << shots.samples << " samples, "
        << weights->layout().size() << " tensors as " << dtype_name(dtype) << ", parameters sharded over " << context.size()
        << " rank(s), written to " << job.out << "\n";
}

std::vector<TransportRow> run_decoder_transport(const TransportJob& job, std::ostream& log, const JobContext& context) {
  std::unique_ptr<Decoder> model;
  TokenData pool, test, shots, support;
  torch::Device device = torch::kCPU;
  context.agree([&] {
    load_decoder_inputs(job.model, job.target, job.data, context, model, pool, device, log);
    refuse_image_options(job.model, job.test);
    if (job.test.spec.empty()) throw InputError("transport needs --test-data: token data read only for the final evaluation");
    test = load_token_data(job.test.spec);
    check_vocabulary(test, model->config().vocab_size);
    if (job.selection.num_batches > 0) throw InputError("--num-batches is for image data; use --num-samples or --indices with token data");
    if (job.selection.indices_file.empty() && job.num_samples == 0)
      throw InputError("transport of a decoder takes its shots with --num-samples N (the first N of a shuffle with --seed) or --indices FILE");
  });
  const Decoder& decoder = *model;
  context.agree([&] {
    std::vector<long long> shot_indices, support_indices;
    ShotPool shot_pool;
    shot_pool.samples = pool.samples;
    shot_pool.name = job.data.spec;
    shot_pool.model_features = sharded_feature_source(decoder, pool, token_samples, nullptr, context, device);
    split_pool(shot_pool, job, shot_indices, support_indices);
    save_chosen_shots(job.selection, shot_indices, context);
    shots = pool.subset(shot_indices);
    support = pool.subset(support_indices);
  });
  return run_sharded_transport(job, decoder, {token_samples(shots), token_samples(support), token_samples(test), "test tok acc", "token_accuracy"},
                               device, log, context);
}

}  // namespace gradfix
