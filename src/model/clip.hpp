#pragma once
// Internal to the LibTorch part: the vision tower of CLIP from a Hugging Face directory (a
// `CLIPModel`, model_type "clip", or a `CLIPVisionModelWithProjection`, "clip_vision_model"),
// under the checkpoint's own names, with a frozen zero-shot head: logits = exp(logit_scale) *
// normalize(visual_projection(post_layernorm(CLS))) @ head^T. The text tower is not needed.

#include <torch/torch.h>

#include <string>
#include <vector>

#include "architecture.hpp"
#include "gradfix/io/dataset.hpp"

namespace gradfix {

struct ClipConfig {
  std::string directory;
  std::string model_type;  // clip | clip_vision_model
  long long hidden_size = 0;
  long long intermediate_size = 0;
  long long layers = 0;
  long long heads = 0;
  long long image_size = 0;
  long long patch_size = 0;
  long long channels = 3;
  long long projection_dim = 0;
  double layer_norm_eps = 1e-5;
  std::string activation = "quick_gelu";  // quick_gelu | gelu
  double logit_scale_init = 0.0;          // config's logit_scale_init_value (0: none given)
  long long tokens() const { return 1 + (image_size / patch_size) * (image_size / patch_size); }
};

// Reads DIR/config.json: the vision config (top level for clip_vision_model, "vision_config" for
// clip). Keys that change the math must have values gradfix implements (hidden_act quick_gelu or
// gelu, a patch size that divides the image); the others are ignored.
ClipConfig read_clip_config(const std::string& directory);
bool is_clip_model_type(const std::string& model_type);

// The vision tower's tensors and visual_projection.weight (the parameters GradFix masks).
std::vector<TensorInfo> clip_vision_layout(const ClipConfig& config);
// The checkpoint against the layout: missing and misshapen tensors listed in one InputError; the
// text tower, text_projection, logit_scale and position_ids buffers may be there besides.
void check_clip_checkpoint(const ClipConfig& config);

// A zero-shot head file: one tensor [classes, projection_dim] of class text embeddings (the
// tensor "head", or the file's only tensor), rows normalised here; optionally a scalar
// "logit_scale". InputError naming the file and both sizes when it does not fit.
struct ZeroShotHead {
  torch::Tensor weight;       // [C, projection_dim], float32, unit rows
  double logit_scale = 0.0;   // 0: not in the file
};
ZeroShotHead read_zero_shot_head(const std::string& path, const ClipConfig& config);
// exp() of it: the head file's, else the checkpoint's logit_scale, else the config's initial value.
double clip_logit_scale(const ClipConfig& config, const ZeroShotHead& head);

class ClipVision final : public LayeredModel {
 public:
  ClipVision(ClipConfig config, torch::Tensor head, double logit_scale);
  const ClipConfig& config() const { return config_; }
  long long classes() const { return head_.size(0); }

  std::vector<TensorInfo> layout() const override { return clip_vision_layout(config_); }
  std::string directory() const override { return config_.directory; }
  long long layers() const override { return config_.layers; }
  std::vector<std::string> input_names() const override;
  std::vector<std::string> layer_names(long long layer) const override;
  std::vector<std::string> output_names() const override;
  // Images [n, C, H, W] (preprocessed) -> [n, tokens, hidden] after pre_layrnorm.
  torch::Tensor input(const Parameters& parameters, const Batch& batch, GradientRecorder* recorder = nullptr) const override;
  torch::Tensor layer(long long index, const Parameters& parameters, const torch::Tensor& hidden, const Batch& batch,
                      GradientRecorder* recorder = nullptr) const override;
  // [n, tokens, hidden] -> logits [n, classes] against the frozen head.
  torch::Tensor output(const Parameters& parameters, const torch::Tensor& hidden, GradientRecorder* recorder = nullptr) const override;
  torch::Tensor losses(const torch::Tensor& logits, const Batch& batch) const override;
  std::pair<long long, long long> hits(const torch::Tensor& logits, const Batch& batch) const override;
  // The text tower, text_projection, logit_scale and the position_ids buffer.
  bool ignores(const std::string& name) const override;
  std::string model_type() const override { return config_.model_type; }
  // The projected image embeddings [n, projection_dim] (before normalisation).
  torch::Tensor embed_images(const Parameters& parameters, const Batch& batch) const;
  // Shot selection compares images by their projected embeddings, as CLIP's zero-shot head does.
  long long feature_size() const override { return config_.projection_dim; }
  torch::Tensor features(const Parameters& parameters, const torch::Tensor& hidden, const Batch& batch) const override;

 private:
  // post_layernorm on the class token, then visual_projection: [n, tokens, hidden] -> [n, projection_dim].
  torch::Tensor project(const Parameters& parameters, const torch::Tensor& hidden, GradientRecorder* recorder) const;

  ClipConfig config_;
  torch::Tensor head_;  // [C, projection_dim] on the CPU; moved to the logits' device when used
  double scale_ = 1.0;  // exp(logit_scale)
};

// How 8-bit images [H, W, C] become the model's input, as CLIP's image processor does it: from
// DIR/preprocessor_config.json (size.shortest_edge, crop_size, image_mean, image_std), else the
// config's image_size and CLIP's published mean and standard deviation. The crop must be the
// model's image_size.
struct ImagePreprocessing {
  long long shortest_edge = 0;
  long long crop = 0;
  std::vector<double> mean, std;
};
ImagePreprocessing read_image_preprocessing(const ClipConfig& config);
// uint8 [n, H, W, C] -> float32 [n, C, crop, crop]: the shorter side resized to shortest_edge
// (bicubic with antialiasing, each value rounded to 8 bits as Pillow's resize leaves it; the
// longer side in proportion, rounded), the centre crop, scaled to [0, 1], normalised per channel.
torch::Tensor preprocess_images(const torch::Tensor& pixels, const ImagePreprocessing& preprocessing);

// Images as the sharded executor reads them (inputs [n, C, H, W], labels [n]): float32 as they
// are, or 8-bit pixels (Dataset::bytes) through `preprocessing`, a group at a time.
SampleSource image_samples(const Dataset& data, const ImagePreprocessing* preprocessing = nullptr);

}  // namespace gradfix
