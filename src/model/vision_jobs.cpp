#include "vision_jobs.hpp"

#include <algorithm>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <optional>

#include "classifier.hpp"
#include "architecture.hpp"
#include "clip.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/dataset.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/dist/progress.hpp"
#include "sharded_executor.hpp"
#include "sharded_transport.hpp"
#include "shots.hpp"

namespace gradfix {
namespace {

struct ClipInputs {
  ClipConfig config;
  ImagePreprocessing preprocessing;  // for 8-bit images
  ZeroShotHead head;
  double scale = 1.0;
  Dataset data;
  torch::Device device = torch::kCPU;
};

// Images checked against the model's input and the head's classes: preprocessed float32
// [N, C, image_size, image_size], or 8-bit [N, H, W, C] that image_samples preprocesses.
Dataset load_images(const std::string& spec, const ClipConfig& config, const ZeroShotHead& head, const std::string& head_path) {
  Dataset data = load_dataset(spec, true);
  if (!data.bytes.empty()) {
    if (data.sample_shape.size() != 3 || data.sample_shape[2] != config.channels)
      throw InputError(spec + ": 8-bit images of shape " + format_shape(data.sample_shape) + " but the model takes [height, width, " +
                       std::to_string(config.channels) + "] pixels (uint8 [N, H, W, C])");
    if (data.sample_shape[0] > 16384 || data.sample_shape[1] > 16384)
      throw InputError(spec + ": 8-bit images of " + std::to_string(data.sample_shape[0]) + " x " + std::to_string(data.sample_shape[1]) +
                       " pixels; gradfix resizes images of up to 16384 pixels a side");
  } else {
    const std::vector<long long> expected = {config.channels, config.image_size, config.image_size};
    if (data.sample_shape != expected)
      throw InputError(spec + ": images of shape " + format_shape(data.sample_shape) + " but the model takes " + format_shape(expected) +
                       " (preprocessed float32 [N, channels, image_size, image_size], or uint8 [N, height, width, channels])");
  }
  if (data.classes > head.weight.size(0))
    throw InputError(spec + ": labels go up to " + std::to_string(data.classes - 1) + " but the head " + head_path + " has " +
                     std::to_string(head.weight.size(0)) + " classes");
  return data;
}

// What eval and signs read first: the config, the checkpoint checked against it, the head, the
// images checked against the model's input, and the device.
ClipInputs load_clip_inputs(const std::string& model, const std::string& weights, const std::string& head, const DataOptions& data,
                            const JobContext& context) {
  if (!model.empty() && model != "builtin") throw InputError("--model " + model + ": a Hugging Face model directory names its architecture in config.json");
  if (data.transform != "none") throw InputError("--transform " + data.transform + ": CLIP takes images preprocessed as they are");
  if (head.empty()) throw InputError(weights + " is a CLIP model: give its zero-shot head with --head FILE ([classes, projection_dim])");
  ClipInputs in;
  in.config = read_clip_config(weights);
  check_clip_checkpoint(in.config);
  in.preprocessing = read_image_preprocessing(in.config);
  in.head = read_zero_shot_head(head, in.config);
  in.scale = clip_logit_scale(in.config, in.head);
  in.data = load_images(data.spec, in.config, in.head, head);
  in.device = parse_device(context.device, context.local_rank);
  return in;
}

}  // namespace

void run_clip_eval(const EvalJob& job, std::ostream& log, const JobContext& context) {
  ClipInputs in;
  context.agree([&] { in = load_clip_inputs(job.model, job.weights, job.head, job.data, context); });
  std::unique_ptr<ShardedWeights> weights;
  context.agree([&] { weights = std::make_unique<ShardedWeights>(clip_vision_layout(in.config), in.config.directory, context); });
  const ClipVision model(in.config, in.head.weight, in.scale);
  const ShardedEvaluation evaluation = sharded_evaluation(model, *weights, image_samples(in.data, &in.preprocessing), context, in.device);
  const double mean = evaluation.mean_loss();
  const double accuracy = static_cast<double>(evaluation.hits) / static_cast<double>(std::max(1LL, evaluation.targets));
  if (!job.results.empty())
    context.agree([&] {
      if (context.is_root())
        write_text_file_atomically(job.results, nlohmann::json{{"model_type", in.config.model_type}, {"samples", in.data.size()},
                                                          {"classes", in.head.weight.size(0)}, {"accuracy", accuracy},
                                                          {"mean_loss", mean}, {"per_sample_loss", evaluation.losses}}.dump(2) + "\n");
    });
  if (!context.is_root()) return;
  log << "eval: " << in.config.model_type << " vision tower, " << in.data.size() << " images, " << in.head.weight.size(0) << " classes, accuracy "
      << std::fixed << std::setprecision(2) << 100.0 * accuracy << "%, mean loss " << std::setprecision(4) << mean
      << (job.results.empty() ? "" : ", results in " + job.results) << ", parameters sharded over " << context.size() << " rank(s)\n";
  log.unsetf(std::ios::fixed);
}

namespace {

// The images as a pool to draw shots from: their labels, B's embeddings for --selection (with
// `weights`, or B read on first use), and the preprocessed images for a TorchScript extractor.
ShotPool clip_shot_pool(const ClipInputs& in, const ClipVision& model, const std::string& name, std::shared_ptr<ShardedWeights> weights,
                        const JobContext& context) {
  ShotPool pool;
  pool.samples = in.data.size();
  pool.labels = in.data.labels;
  pool.classes = in.data.classes;
  pool.name = name;
  // The projected image embeddings of B, computed with the parameters sharded.
  pool.model_features = sharded_feature_source(
      model, in.data, [&in](const Dataset& part) { return image_samples(part, &in.preprocessing); }, std::move(weights), context, in.device);
  pool.inputs = [&in](const std::vector<long long>& indices) { return image_samples(in.data, &in.preprocessing).batch(indices, torch::kCPU).inputs; };
  return pool;
}

}  // namespace

void run_clip_signs(const SignsJob& job, std::ostream& log, const JobContext& context) {
  ClipInputs in;
  context.agree([&] { in = load_clip_inputs(job.model, job.weights, job.head, job.data, context); });
  std::shared_ptr<ShardedWeights> weights;
  context.agree([&] { weights = std::make_shared<ShardedWeights>(clip_vision_layout(in.config), in.config.directory, context); });
  const ClipVision model(in.config, in.head.weight, in.scale);
  Dataset shots;
  context.agree([&] {
    // The shots: an indices file, the first N of a seeded shuffle, or K per class by --selection.
    const ShotPool pool = clip_shot_pool(in, model, job.data.spec, weights, context);
    const std::vector<long long> chosen = choose_shots(pool, job.selection, job.shots_per_class, job.num_samples, job.seed, false);
    save_chosen_shots(job.selection, chosen, context);
    shots = in.data.subset(chosen);
    shots.classes = in.data.classes;
  });
  ShardedSignsOptions options;
  options.sign_mode = job.sign_mode;
  options.method = job.method;
  options.precision = job.vote_precision;
  Progress progress(context, "signs", shots.size(), 0, "samples");
  std::optional<CurrentProgress> current(progress);
  const ShardedStatistics statistics = sharded_statistics(model, *weights, image_samples(shots, &in.preprocessing), options, context, in.device);
  current.reset();
  progress.finish();
  const DType dtype = write_sharded_statistics(context, *weights, statistics, job.sign_mode, job.seed, in.config.model_type, job.out,
                                               vote_precision_metadata(job.vote_precision));
  if (context.is_root())
    log << "signs " << sign_mode_name(job.sign_mode) << (job.vote_precision == VotePrecision::kF32 ? "" : " (bf16 products)") << ": " << in.config.model_type << " vision tower, " << shots.size() << " images, "
        << weights->layout().size() << " tensors as " << dtype_name(dtype) << ", parameters sharded over " << context.size()
        << " rank(s), written to " << job.out << "\n";
}

std::vector<TransportRow> run_clip_transport(const TransportJob& job, std::ostream& log, const JobContext& context) {
  ClipInputs in;
  Dataset test, shots, support;
  context.agree([&] {
    in = load_clip_inputs(job.model, job.target, job.head, job.data, context);
    if (job.test.spec.empty()) throw InputError("transport needs --test-data: images read only for the final evaluation");
    if (job.test.transform != "none") throw InputError("--transform " + job.test.transform + ": CLIP takes images preprocessed as they are");
    test = load_images(job.test.spec, in.config, in.head, job.head);
    if (job.selection.num_batches > 0) throw InputError("--num-batches: a CLIP transport takes --shots-per-class, --num-samples or --indices");
  });
  const ClipVision model(in.config, in.head.weight, in.scale);
  context.agree([&] {
    // Features for --selection come from B itself, read only if a strategy asks for them.
    std::vector<long long> shot_indices, support_indices;
    split_pool(clip_shot_pool(in, model, job.data.spec, nullptr, context), job, shot_indices, support_indices);
    save_chosen_shots(job.selection, shot_indices, context);
    shots = in.data.subset(shot_indices);
    support = in.data.subset(support_indices);
  });
  return run_sharded_transport(job, model, {image_samples(shots, &in.preprocessing), image_samples(support, &in.preprocessing),
                                                      image_samples(test, &in.preprocessing), "test acc", "accuracy"},
                               in.device, log, context);
}

}  // namespace gradfix
