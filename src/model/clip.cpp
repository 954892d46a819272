#include "clip.hpp"

#include <sys/stat.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "gradfix/io/model_files.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {
namespace {

using Json = nlohmann::json;

const std::string kEmbeddings = "vision_model.embeddings.";

long long positive(const Json& config, const std::string& path, const std::string& key) {
  if (!config.contains(key)) throw InputError(path + ": \"" + key + "\" is missing from the vision config");
  const Json& value = config.at(key);
  if (!value.is_number_integer() || value.get<long long>() < 1 || value.get<long long>() > (1LL << 30))
    throw InputError(path + ": \"" + key + "\" must be a positive integer, got " + value.dump());
  return value.get<long long>();
}

// x normalised over its last dimension, then scaled and shifted: LayerNorm with its two captures.
torch::Tensor layer_norm(const Parameters& p, const std::string& prefix, const torch::Tensor& x, double eps, GradientRecorder* recorder) {
  const torch::Tensor centred = x - x.mean(-1, true);
  const torch::Tensor normed = centred * torch::rsqrt(centred.pow(2).mean(-1, true) + eps);
  torch::Tensor out = normed * p.at(prefix + ".weight") + p.at(prefix + ".bias");
  if (recorder != nullptr && out.requires_grad()) {
    out.retain_grad();
    recorder->add({prefix + ".weight", Capture::Kind::kScale, normed.detach(), out});
    recorder->add({prefix + ".bias", Capture::Kind::kBias, torch::Tensor(), out});
  }
  return out;
}

std::string layer_prefix(long long layer) { return "vision_model.encoder.layers." + std::to_string(layer) + "."; }

}  // namespace

bool is_clip_model_type(const std::string& model_type) { return model_type == "clip" || model_type == "clip_vision_model"; }

ClipConfig read_clip_config(const std::string& directory) {
  const std::string path = model_file(directory, "config.json");
  Json root;
  try {
    root = Json::parse(read_config_text(path), nullptr, true, false);
  } catch (const Json::exception& error) {
    throw InputError(path + ": not valid JSON: " + escaped_name(error.what()));
  }
  if (!root.is_object() || !root.contains("model_type") || !root.at("model_type").is_string())
    throw InputError(path + ": \"model_type\" is missing");
  ClipConfig out;
  out.directory = directory;
  out.model_type = root.at("model_type").get<std::string>();
  if (!is_clip_model_type(out.model_type)) throw InputError(path + ": \"model_type\" is \"" + out.model_type + "\", not clip");
  const Json* vision = &root;
  if (out.model_type == "clip") {
    if (!root.contains("vision_config") || !root.at("vision_config").is_object())
      throw InputError(path + ": a clip config needs \"vision_config\"");
    vision = &root.at("vision_config");
  }
  out.hidden_size = positive(*vision, path, "hidden_size");
  out.intermediate_size = positive(*vision, path, "intermediate_size");
  out.layers = positive(*vision, path, "num_hidden_layers");
  out.heads = positive(*vision, path, "num_attention_heads");
  out.image_size = positive(*vision, path, "image_size");
  out.patch_size = positive(*vision, path, "patch_size");
  if (vision->contains("num_channels")) out.channels = positive(*vision, path, "num_channels");
  // The projection width: top level for a CLIPModel, in the vision config for the vision model.
  const Json& projection_owner = root.contains("projection_dim") ? root : *vision;
  out.projection_dim = positive(projection_owner, path, "projection_dim");
  if (vision->contains("layer_norm_eps")) {
    const Json& eps = vision->at("layer_norm_eps");
    if (!eps.is_number() || !(eps.get<double>() > 0.0)) throw InputError(path + ": \"layer_norm_eps\" must be positive, got " + eps.dump());
    out.layer_norm_eps = eps.get<double>();
  }
  if (vision->contains("hidden_act")) {
    const Json& act = vision->at("hidden_act");
    if (!act.is_string() || (act.get<std::string>() != "quick_gelu" && act.get<std::string>() != "gelu"))
      throw InputError(path + ": \"hidden_act\": " + act.dump() + " is not supported: gradfix implements quick_gelu and gelu");
    out.activation = act.get<std::string>();
  }
  if (out.hidden_size % out.heads != 0)
    throw InputError(path + ": \"hidden_size\" " + std::to_string(out.hidden_size) + " is not a multiple of \"num_attention_heads\" " +
                     std::to_string(out.heads));
  if (out.image_size % out.patch_size != 0)
    throw InputError(path + ": \"patch_size\" " + std::to_string(out.patch_size) + " does not divide \"image_size\" " + std::to_string(out.image_size));
  if (root.contains("logit_scale_init_value") && root.at("logit_scale_init_value").is_number())
    out.logit_scale_init = root.at("logit_scale_init_value").get<double>();
  return out;
}

std::vector<TensorInfo> clip_vision_layout(const ClipConfig& c) {
  const long long d = c.hidden_size;
  std::vector<TensorInfo> layout = {
      {kEmbeddings + "class_embedding", DType::kF32, {d}},
      {kEmbeddings + "patch_embedding.weight", DType::kF32, {d, c.channels, c.patch_size, c.patch_size}},
      {kEmbeddings + "position_embedding.weight", DType::kF32, {c.tokens(), d}},
      {"vision_model.pre_layrnorm.weight", DType::kF32, {d}},
      {"vision_model.pre_layrnorm.bias", DType::kF32, {d}}};
  for (long long i = 0; i < c.layers; ++i) {
    const std::string p = layer_prefix(i);
    for (const char* projection : {"k_proj", "v_proj", "q_proj", "out_proj"}) {
      layout.push_back({p + "self_attn." + projection + ".weight", DType::kF32, {d, d}});
      layout.push_back({p + "self_attn." + projection + ".bias", DType::kF32, {d}});
    }
    layout.push_back({p + "layer_norm1.weight", DType::kF32, {d}});
    layout.push_back({p + "layer_norm1.bias", DType::kF32, {d}});
    layout.push_back({p + "mlp.fc1.weight", DType::kF32, {c.intermediate_size, d}});
    layout.push_back({p + "mlp.fc1.bias", DType::kF32, {c.intermediate_size}});
    layout.push_back({p + "mlp.fc2.weight", DType::kF32, {d, c.intermediate_size}});
    layout.push_back({p + "mlp.fc2.bias", DType::kF32, {d}});
    layout.push_back({p + "layer_norm2.weight", DType::kF32, {d}});
    layout.push_back({p + "layer_norm2.bias", DType::kF32, {d}});
  }
  layout.push_back({"vision_model.post_layernorm.weight", DType::kF32, {d}});
  layout.push_back({"vision_model.post_layernorm.bias", DType::kF32, {d}});
  layout.push_back({"visual_projection.weight", DType::kF32, {c.projection_dim, d}});
  return layout;
}

void check_clip_checkpoint(const ClipConfig& config) {
  check_against_model(*open_reader(config.directory), ClipVision(config, torch::Tensor(), 1.0), false);
}

ZeroShotHead read_zero_shot_head(const std::string& path, const ClipConfig& config) {
  const auto reader = open_reader(path);
  const TensorInfo* head = reader->find("head");
  if (head == nullptr) {
    for (const auto& tensor : reader->tensors())
      if (tensor.shape.size() == 2) {
        if (head != nullptr) throw InputError(path + ": several matrices and none named 'head'; name the class embeddings 'head'");
        head = &tensor;
      }
  }
  if (head == nullptr) throw InputError(path + ": no zero-shot head: a tensor 'head' [classes, projection_dim] is expected");
  if (head->shape.size() != 2 || head->shape[1] != config.projection_dim || head->shape[0] < 1 || head->shape[0] > (1LL << 24))
    throw InputError(path + ": the head '" + escaped_name(head->name) + "' is " + format_shape(head->shape) + ", the model needs [classes, " +
                     std::to_string(config.projection_dim) + "] (projection_dim of " + config.directory + ")");
  std::vector<float> values = reader->read_f32(head->name);
  ZeroShotHead out;
  out.weight = torch::from_blob(values.data(), {head->shape[0], head->shape[1]}, torch::kFloat32).clone();
  const torch::Tensor norms = out.weight.norm(2, 1, true);
  if (!torch::isfinite(out.weight).all().item<bool>() || norms.min().item<double>() <= 0.0)
    throw InputError(path + ": the head has a zero or non-finite row; each row is a class's text embedding");
  out.weight = out.weight / norms;
  if (const TensorInfo* scale = reader->find("logit_scale")) {
    if (scale->numel() != 1) throw InputError(path + ": 'logit_scale' must hold one value, it holds " + std::to_string(scale->numel()));
    out.logit_scale = reader->read_f32("logit_scale")[0];
    if (!std::isfinite(out.logit_scale) || out.logit_scale > 20.0 || out.logit_scale < -20.0)
      throw InputError(path + ": 'logit_scale' " + std::to_string(out.logit_scale) + " is out of range (its exp scales the logits)");
  }
  return out;
}

double clip_logit_scale(const ClipConfig& config, const ZeroShotHead& head) {
  if (head.logit_scale != 0.0) return std::exp(head.logit_scale);
  const auto reader = open_reader(config.directory);
  if (const TensorInfo* scale = reader->find("logit_scale")) {
    if (scale->numel() != 1) throw InputError(config.directory + ": 'logit_scale' must hold one value");
    const double value = reader->read_f32("logit_scale")[0];
    if (!std::isfinite(value) || value > 20.0 || value < -20.0) throw InputError(config.directory + ": 'logit_scale' " + std::to_string(value) + " is out of range");
    return std::exp(value);
  }
  if (config.logit_scale_init != 0.0) return std::exp(config.logit_scale_init);
  throw InputError(config.directory + " has no logit_scale (a vision-only checkpoint): put a scalar 'logit_scale' in the head file "
                   "(4.6052 for CLIP's trained 100)");
}

ClipVision::ClipVision(ClipConfig config, torch::Tensor head, double logit_scale)
    : config_(std::move(config)), head_(std::move(head)), scale_(logit_scale) {}

bool ClipVision::ignores(const std::string& name) const {
  return name.rfind("text_model.", 0) == 0 || name == "text_projection.weight" || name == "logit_scale" || name == kEmbeddings + "position_ids";
}

std::vector<std::string> ClipVision::input_names() const {
  return {kEmbeddings + "class_embedding", kEmbeddings + "patch_embedding.weight", kEmbeddings + "position_embedding.weight",
          "vision_model.pre_layrnorm.weight", "vision_model.pre_layrnorm.bias"};
}

std::vector<std::string> ClipVision::layer_names(long long layer) const {
  std::vector<std::string> names;
  const std::string prefix = layer_prefix(layer);
  for (const auto& tensor : clip_vision_layout(config_))
    if (tensor.name.rfind(prefix, 0) == 0) names.push_back(tensor.name);
  return names;
}

std::vector<std::string> ClipVision::output_names() const {
  return {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias", "visual_projection.weight"};
}

torch::Tensor ClipVision::input(const Parameters& p, const Batch& batch, GradientRecorder* recorder) const {
  const ClipConfig& c = config_;
  const torch::Tensor& pixels = batch.inputs;
  const long long n = pixels.size(0), patch = c.patch_size, grid = c.image_size / patch, d = c.hidden_size;
  // The patch convolution (stride = kernel) is a Linear layer on the unfolded patches, in the
  // weight's (channel, row, column) order and the patches' row-major order.
  const torch::Tensor patches =
      pixels.unfold(2, patch, patch).unfold(3, patch, patch).permute({0, 2, 3, 1, 4, 5}).reshape({n, grid * grid, c.channels * patch * patch});
  torch::Tensor embedded = torch::matmul(patches, p.at(kEmbeddings + "patch_embedding.weight").reshape({d, -1}).t());
  torch::Tensor cls = p.at(kEmbeddings + "class_embedding").view({1, 1, d}).expand({n, 1, d});
  torch::Tensor positions = p.at(kEmbeddings + "position_embedding.weight").unsqueeze(0).expand({n, c.tokens(), d});
  if (recorder != nullptr) {
    // Leaves whose gradients are those of the three parameters' uses, per sample.
    embedded = embedded.detach().requires_grad_(true);
    cls = cls.detach().clone().requires_grad_(true);
    positions = positions.detach().clone().requires_grad_(true);
    recorder->add({kEmbeddings + "patch_embedding.weight", Capture::Kind::kLinearWeight, patches, embedded});
    recorder->add({kEmbeddings + "class_embedding", Capture::Kind::kBias, torch::Tensor(), cls});
    recorder->add({kEmbeddings + "position_embedding.weight", Capture::Kind::kAdditive, torch::Tensor(), positions});
  }
  return layer_norm(p, "vision_model.pre_layrnorm", torch::cat({cls, embedded}, 1) + positions, c.layer_norm_eps, recorder);
}

torch::Tensor ClipVision::layer(long long index, const Parameters& p, const torch::Tensor& hidden, const Batch&, GradientRecorder* recorder) const {
  const ClipConfig& c = config_;
  const long long n = hidden.size(0), t = hidden.size(1), head_dim = c.hidden_size / c.heads;
  const std::string prefix = layer_prefix(index);
  const torch::Tensor x = layer_norm(p, prefix + "layer_norm1", hidden, c.layer_norm_eps, recorder);
  auto heads = [&](const torch::Tensor& y) { return y.view({n, t, c.heads, head_dim}).transpose(1, 2); };
  const torch::Tensor q = heads(recorded_linear(p, prefix + "self_attn.q_proj", x, true, recorder));
  const torch::Tensor k = heads(recorded_linear(p, prefix + "self_attn.k_proj", x, true, recorder));
  const torch::Tensor v = heads(recorded_linear(p, prefix + "self_attn.v_proj", x, true, recorder));
  const torch::Tensor scores = torch::matmul(q, k.transpose(2, 3)) / std::sqrt(static_cast<double>(head_dim));
  const torch::Tensor weights = torch::softmax(scores, -1, torch::kFloat32).to(q.scalar_type());
  const torch::Tensor attended = torch::matmul(weights, v).transpose(1, 2).reshape({n, t, c.hidden_size});
  const torch::Tensor after_attention = hidden + recorded_linear(p, prefix + "self_attn.out_proj", attended, true, recorder);
  const torch::Tensor y = layer_norm(p, prefix + "layer_norm2", after_attention, c.layer_norm_eps, recorder);
  torch::Tensor inner = recorded_linear(p, prefix + "mlp.fc1", y, true, recorder);
  inner = c.activation == "quick_gelu" ? inner * torch::sigmoid(1.702 * inner) : torch::gelu(inner);
  return after_attention + recorded_linear(p, prefix + "mlp.fc2", inner, true, recorder);
}

torch::Tensor ClipVision::output(const Parameters& p, const torch::Tensor& hidden, GradientRecorder* recorder) const {
  if (!head_.defined()) throw InputError(config_.directory + ": a CLIP model needs a zero-shot head (--head FILE)");
  const torch::Tensor projected = project(p, hidden, recorder);
  const torch::Tensor normed = projected / projected.norm(2, -1, true);
  return scale_ * torch::matmul(normed, head_.to(normed.device(), normed.scalar_type()).t());
}

torch::Tensor ClipVision::losses(const torch::Tensor& logits, const Batch& batch) const {
  return torch::nn::functional::cross_entropy(logits, batch.labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
}

std::pair<long long, long long> ClipVision::hits(const torch::Tensor& logits, const Batch& batch) const {
  return {logits.argmax(-1).eq(batch.labels).sum().item<int64_t>(), logits.size(0)};
}

torch::Tensor ClipVision::project(const Parameters& p, const torch::Tensor& hidden, GradientRecorder* recorder) const {
  // The class token, kept three-dimensional so that the captures see one position per sample.
  const torch::Tensor pooled = layer_norm(p, "vision_model.post_layernorm", hidden.slice(1, 0, 1), config_.layer_norm_eps, recorder);
  return recorded_linear(p, "visual_projection", pooled, false, recorder).squeeze(1);
}

torch::Tensor ClipVision::features(const Parameters& p, const torch::Tensor& hidden, const Batch& /*batch*/) const {
  return project(p, hidden, nullptr);
}

torch::Tensor ClipVision::embed_images(const Parameters& p, const Batch& batch) const {
  torch::Tensor hidden = input(p, batch);
  for (long long i = 0; i < config_.layers; ++i) hidden = layer(i, p, hidden, batch);
  return project(p, hidden, nullptr);
}

ImagePreprocessing read_image_preprocessing(const ClipConfig& config) {
  ImagePreprocessing out;
  out.shortest_edge = out.crop = config.image_size;
  out.mean = {0.48145466, 0.4578275, 0.40821073};  // CLIP's published statistics (OpenAI)
  out.std = {0.26862954, 0.26130258, 0.27577711};
  const std::string path = model_file(config.directory, "preprocessor_config.json");
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) return out;
  Json root;
  try {
    root = Json::parse(read_config_text(path), nullptr, true, false);
  } catch (const Json::exception& error) {
    throw InputError(path + ": not valid JSON: " + escaped_name(error.what()));
  }
  if (!root.is_object()) throw InputError(path + ": not a JSON object");
  // size: {"shortest_edge": N} or N; crop_size: {"height": N, "width": N} or N.
  auto size_of = [&](const char* key, const char* inner, long long fallback) {
    if (!root.contains(key)) return fallback;
    const Json* value = &root.at(key);
    if (value->is_object()) {
      if (!value->contains(inner)) throw InputError(path + ": \"" + key + "\" has no \"" + inner + "\"");
      value = &value->at(inner);
    }
    if (!value->is_number_integer() || value->get<long long>() < 1 || value->get<long long>() > 16384)
      throw InputError(path + ": \"" + key + "\" must be a size from 1 to 16384, got " + value->dump());
    return value->get<long long>();
  };
  out.shortest_edge = size_of("size", "shortest_edge", config.image_size);
  out.crop = size_of("crop_size", "height", out.shortest_edge);
  if (root.contains("crop_size") && root.at("crop_size").is_object() && root.at("crop_size").contains("width") &&
      root.at("crop_size").at("width") != root.at("crop_size").at("height"))
    throw InputError(path + ": \"crop_size\" is not square: " + root.at("crop_size").dump());
  auto channels_of = [&](const char* key, std::vector<double>& values, bool positive_only) {
    if (!root.contains(key)) return;
    const Json& list = root.at(key);
    if (!list.is_array() || static_cast<long long>(list.size()) != config.channels)
      throw InputError(path + ": \"" + key + "\" must list " + std::to_string(config.channels) + " numbers, got " + list.dump());
    values.clear();
    for (const Json& item : list) {
      if (!item.is_number() || !std::isfinite(item.get<double>()) || (positive_only && !(item.get<double>() > 0.0)))
        throw InputError(path + ": \"" + key + "\" holds " + item.dump() + (positive_only ? "; each must be positive" : "; each must be finite"));
      values.push_back(item.get<double>());
    }
  };
  channels_of("image_mean", out.mean, false);
  channels_of("image_std", out.std, true);
  if (static_cast<long long>(out.mean.size()) != config.channels || static_cast<long long>(out.std.size()) != config.channels)
    throw InputError(path + ": the model has " + std::to_string(config.channels) + " channels; give \"image_mean\" and \"image_std\" for each");
  if (out.crop != config.image_size)
    throw InputError(path + ": \"crop_size\" is " + std::to_string(out.crop) + " but the model's image_size is " + std::to_string(config.image_size));
  if (out.shortest_edge < out.crop)
    throw InputError(path + ": \"size\" " + std::to_string(out.shortest_edge) + " is smaller than \"crop_size\" " + std::to_string(out.crop));
  return out;
}

torch::Tensor preprocess_images(const torch::Tensor& pixels, const ImagePreprocessing& preprocessing) {
  torch::Tensor x = pixels.permute({0, 3, 1, 2}).to(torch::kFloat32);
  const int64_t height = x.size(2), width = x.size(3);
  const double scale = static_cast<double>(preprocessing.shortest_edge) / static_cast<double>(std::min(height, width));
  // Python's round() (half to even), as the Pillow converter computes the size.
  const auto resized_height = std::max<int64_t>(preprocessing.crop, static_cast<int64_t>(std::nearbyint(static_cast<double>(height) * scale)));
  const auto resized_width = std::max<int64_t>(preprocessing.crop, static_cast<int64_t>(std::nearbyint(static_cast<double>(width) * scale)));
  if (resized_height != height || resized_width != width) {
    namespace F = torch::nn::functional;
    x = F::interpolate(x, F::InterpolateFuncOptions()
                              .size(std::vector<int64_t>{resized_height, resized_width})
                              .mode(torch::kBicubic)
                              .align_corners(false)
                              .antialias(true))
            .round()
            .clamp(0, 255);
  }
  const int64_t top = (resized_height - preprocessing.crop) / 2, left = (resized_width - preprocessing.crop) / 2;
  x = x.slice(2, top, top + preprocessing.crop).slice(3, left, left + preprocessing.crop);
  const auto channels = static_cast<int64_t>(preprocessing.mean.size());
  const torch::Tensor mean = torch::tensor(preprocessing.mean, torch::kFloat64).to(torch::kFloat32).view({1, channels, 1, 1});
  const torch::Tensor std = torch::tensor(preprocessing.std, torch::kFloat64).to(torch::kFloat32).view({1, channels, 1, 1});
  return ((x / 255.0f - mean) / std).contiguous();
}

SampleSource image_samples(const Dataset& data, const ImagePreprocessing* preprocessing) {
  const Dataset* held = &data;
  return {data.size(), "the images", [held, preprocessing](const std::vector<long long>& indices, const torch::Device& device) {
            const Dataset part = held->subset(indices);
            std::vector<int64_t> shape = {static_cast<int64_t>(indices.size())};
            for (long long dim : part.sample_shape) shape.push_back(dim);
            const torch::Tensor inputs =
                part.bytes.empty()
                    ? torch::from_blob(const_cast<float*>(part.inputs.data()), shape, torch::kFloat32).to(device, false, true)
                    : preprocess_images(torch::from_blob(const_cast<std::uint8_t*>(part.bytes.data()), shape, torch::kUInt8), *preprocessing)
                          .to(device);
            const torch::Tensor labels =
                torch::from_blob(const_cast<long long*>(part.labels.data()), {static_cast<int64_t>(indices.size())}, torch::kInt64).to(device, false, true);
            return Batch{inputs, labels, torch::Tensor(), torch::Tensor()};
          }};
}

namespace {
// Without a head the model runs up to its output stage; the jobs give it the head.
const ArchitectureRegistration kClip({"clip", "clip_vision_model"}, ModelInputs::kImages, [](const ModelConfigSource& source) {
  return std::unique_ptr<LayeredModel>(new ClipVision(read_clip_config(source.directory), torch::Tensor(), 1.0));
});
}  // namespace

}  // namespace gradfix
