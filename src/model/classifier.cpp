#include "classifier.hpp"

#include "gradfix/io/atomic_file.hpp"

#include <torch/script.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "gradfix/core/error.hpp"

namespace gradfix {
namespace {

std::string join(const std::vector<long long>& values) {
  std::string text;
  for (std::size_t i = 0; i < values.size(); ++i) text += (i ? "," : "") + std::to_string(values[i]);
  return text;
}

// A built-in model: a Classifier that is also a torch::nn::Module, moved as one.
class BuiltInClassifier : public Classifier, public torch::nn::Module {
 public:
  void to_dtype(torch::ScalarType type) override { torch::nn::Module::to(type); }
  void to_device(const torch::Device& device) override {
    torch::nn::Module::to(device);
    device_ = device;
  }
};

// The MLP: flatten, then Linear layers with ReLU between them; parameters layers.{i}.weight
// [out, in] and layers.{i}.bias [out].
class Mlp final : public BuiltInClassifier {
 public:
  explicit Mlp(const Architecture& architecture) {
    architecture_ = architecture;
    for (std::size_t i = 0; i + 1 < architecture.dims.size(); ++i)
      layers_.push_back(register_module("layers_" + std::to_string(i),
                                        torch::nn::Linear(architecture.dims[i], architecture.dims[i + 1])));
  }

  torch::Tensor forward(const torch::Tensor& inputs) override {
    torch::Tensor x = inputs.reshape({inputs.size(0), -1});
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      x = layers_[i]->forward(x);
      if (i + 1 < layers_.size()) x = torch::relu(x);
    }
    return x;
  }

  std::vector<std::pair<std::string, torch::Tensor>> parameters() override {
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      named.emplace_back("layers." + std::to_string(i) + ".weight", layers_[i]->weight);
      named.emplace_back("layers." + std::to_string(i) + ".bias", layers_[i]->bias);
    }
    return named;
  }

  long long classes() const override { return architecture_.dims.back(); }
  long long input_size() const override { return architecture_.dims.front(); }

  // For a Linear layer z = a W^T + b without a sequence dimension, the per-sample gradient of W is
  // delta_n (x) a_n, so sign(-g_n) = -sign(delta_n) (x) sign(a_n) and the vote sum over samples is
  // one product of sign matrices: -sign(delta)^T sign(a). delta_n = d loss_n / d z_n comes from one
  // backward pass of the summed loss, since z_n depends on sample n alone.
  bool fast_votes(const torch::Tensor& inputs, const torch::Tensor& labels,
                  std::map<std::string, torch::Tensor>& votes) override {
    std::vector<torch::Tensor> activations, outputs;
    torch::Tensor x = inputs.reshape({inputs.size(0), -1});
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      activations.push_back(x.detach());
      torch::Tensor z = layers_[i]->forward(x);
      z.retain_grad();
      outputs.push_back(z);
      x = i + 1 < layers_.size() ? torch::relu(z) : z;
    }
    torch::nn::functional::cross_entropy(x, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
        .backward();
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const torch::Tensor delta_signs = torch::sign(outputs[i].grad());
      const torch::Tensor input_signs = torch::sign(activations[i]);
      // Sums of +-1 and 0 in fp32 are exact integers up to 2^24 samples.
      votes["layers." + std::to_string(i) + ".weight"] = -torch::matmul(delta_signs.t(), input_signs).to(torch::kInt32);
      votes["layers." + std::to_string(i) + ".bias"] = -delta_signs.sum(0).to(torch::kInt32);
    }
    for (auto& parameter : torch::nn::Module::parameters()) parameter.mutable_grad() = torch::Tensor();
    return true;
  }

 private:
  std::vector<torch::nn::Linear> layers_;
};

// The CNN: dims C,H,W,c1,...,ck,classes. Each block is a 3x3 convolution (padding 1), ReLU and
// 2x2 max-pooling; then a Linear head. Parameters convs.{i}.weight [c_out, c_in, 3, 3],
// convs.{i}.bias, head.weight [classes, ck * (H / 2^k) * (W / 2^k)] and head.bias.
class Cnn final : public BuiltInClassifier {
 public:
  explicit Cnn(const Architecture& architecture) {
    architecture_ = architecture;
    const auto& d = architecture.dims;
    channels_ = d[0];
    height_ = d[1];
    width_ = d[2];
    long long in = channels_, h = height_, w = width_;
    for (std::size_t i = 3; i + 1 < d.size(); ++i) {
      convs_.push_back(register_module("conv_" + std::to_string(i - 3), torch::nn::Conv2d(torch::nn::Conv2dOptions(in, d[i], 3).padding(1))));
      in = d[i];
      h /= 2;
      w /= 2;
    }
    head_ = register_module("head", torch::nn::Linear(in * h * w, d.back()));
  }

  torch::Tensor forward(const torch::Tensor& inputs) override {
    torch::Tensor x = inputs.reshape({inputs.size(0), channels_, height_, width_});
    for (auto& conv : convs_) x = torch::max_pool2d(torch::relu(conv->forward(x)), 2);
    return head_->forward(x.flatten(1));
  }

  std::vector<std::pair<std::string, torch::Tensor>> parameters() override {
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (std::size_t i = 0; i < convs_.size(); ++i) {
      named.emplace_back("convs." + std::to_string(i) + ".weight", convs_[i]->weight);
      named.emplace_back("convs." + std::to_string(i) + ".bias", convs_[i]->bias);
    }
    named.emplace_back("head.weight", head_->weight);
    named.emplace_back("head.bias", head_->bias);
    return named;
  }

  long long classes() const override { return architecture_.dims.back(); }
  long long input_size() const override { return channels_ * height_ * width_; }

  // A convolution's per-sample weight gradient sums over positions p: G_n = delta_n P_n^T, with
  // delta_n [c_out, positions] the output gradient and P_n [c_in * 9, positions] the unfolded
  // input patches. Positions make the sign of the sum not factor, so the products are formed per
  // sample (batched, in chunks of samples) and only their signs are summed. The head is a Linear
  // layer: one product of sign matrices, as in the MLP.
  bool fast_votes(const torch::Tensor& inputs, const torch::Tensor& labels, std::map<std::string, torch::Tensor>& votes) override {
    std::vector<torch::Tensor> conv_inputs, conv_outputs;
    torch::Tensor x = inputs.reshape({inputs.size(0), channels_, height_, width_});
    for (auto& conv : convs_) {
      conv_inputs.push_back(x.detach());
      torch::Tensor z = conv->forward(x);
      z.retain_grad();
      conv_outputs.push_back(z);
      x = torch::max_pool2d(torch::relu(z), 2);
    }
    const torch::Tensor flat = x.flatten(1);
    torch::Tensor logits = head_->forward(flat);
    logits.retain_grad();
    torch::nn::functional::cross_entropy(logits, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)).backward();
    constexpr int64_t kChunk = 32;
    for (std::size_t i = 0; i < convs_.size(); ++i) {
      const torch::Tensor patches = torch::nn::functional::unfold(conv_inputs[i], torch::nn::functional::UnfoldFuncOptions(3).padding(1));
      const torch::Tensor delta = conv_outputs[i].grad().flatten(2);  // [N, c_out, positions]
      torch::Tensor weight_votes = torch::zeros({delta.size(1), patches.size(1)}, delta.options().dtype(torch::kInt32));
      for (int64_t start = 0; start < delta.size(0); start += kChunk) {
        const int64_t stop = std::min<int64_t>(delta.size(0), start + kChunk);
        const torch::Tensor per_sample = torch::bmm(delta.slice(0, start, stop), patches.slice(0, start, stop).transpose(1, 2));
        weight_votes -= torch::sign(per_sample).sum(0).to(torch::kInt32);
      }
      votes["convs." + std::to_string(i) + ".weight"] = weight_votes.reshape(convs_[i]->weight.sizes());
      votes["convs." + std::to_string(i) + ".bias"] = -torch::sign(delta.sum(2)).sum(0).to(torch::kInt32);
    }
    const torch::Tensor delta_signs = torch::sign(logits.grad());
    votes["head.weight"] = -torch::matmul(delta_signs.t(), torch::sign(flat.detach())).to(torch::kInt32);
    votes["head.bias"] = -delta_signs.sum(0).to(torch::kInt32);
    for (auto& parameter : torch::nn::Module::parameters()) parameter.mutable_grad() = torch::Tensor();
    return true;
  }

 private:
  long long channels_ = 1, height_ = 1, width_ = 1;
  std::vector<torch::nn::Conv2d> convs_;
  torch::nn::Linear head_{nullptr};
};

// The ViT: dims C,H,W,patch,dim,depth,heads,mlp,classes. Patches (flattened) go through a Linear
// patch embedding, a class token is prepended and position embeddings added; then `depth`
// pre-norm blocks (LayerNorm, multi-head self-attention with a fused qkv projection, LayerNorm,
// GELU MLP), a final LayerNorm and a Linear head on the class token. Every layer is written with
// plain tensor operations so that the fast vote path can capture each one's inputs and output
// gradients.
class Vit final : public BuiltInClassifier {
 public:
  explicit Vit(const Architecture& architecture) {
    architecture_ = architecture;
    const auto& d = architecture.dims;
    channels_ = d[0], height_ = d[1], width_ = d[2], patch_ = d[3], dim_ = d[4], depth_ = d[5], heads_ = d[6];
    const long long mlp = d[7], classes = d[8];
    tokens_ = 1 + (height_ / patch_) * (width_ / patch_);
    auto linear = [&](const std::string& name, long long out, long long in) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      add(name + ".weight", torch::empty({out, in}).uniform_(-bound, bound));
      add(name + ".bias", torch::empty({out}).uniform_(-bound, bound));
    };
    auto norm = [&](const std::string& name) {
      add(name + ".weight", torch::ones({dim_}));
      add(name + ".bias", torch::zeros({dim_}));
    };
    linear("patch_embed", dim_, channels_ * patch_ * patch_);
    add("cls_token", torch::randn({dim_}) * 0.02);
    add("pos_embed", torch::randn({tokens_, dim_}) * 0.02);
    for (long long b = 0; b < depth_; ++b) {
      const std::string block = "blocks." + std::to_string(b);
      norm(block + ".norm1");
      linear(block + ".attn.qkv", 3 * dim_, dim_);
      linear(block + ".attn.proj", dim_, dim_);
      norm(block + ".norm2");
      linear(block + ".mlp.fc1", mlp, dim_);
      linear(block + ".mlp.fc2", dim_, mlp);
    }
    norm("norm");
    linear("head", classes, dim_);
  }

  torch::Tensor forward(const torch::Tensor& inputs) override { return run(inputs, nullptr); }

  std::vector<std::pair<std::string, torch::Tensor>> parameters() override {
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (const auto& name : order_) named.emplace_back(name, parameters_.at(name));
    return named;
  }
  // Parameters are held by name as well: refresh those handles after a move.
  void to_dtype(torch::ScalarType type) override {
    BuiltInClassifier::to_dtype(type);
    refresh();
  }
  void to_device(const torch::Device& device) override {
    BuiltInClassifier::to_device(device);
    refresh();
  }
  long long classes() const override { return architecture_.dims.back(); }
  long long input_size() const override { return channels_ * height_ * width_; }

  // Per-sample gradients of a Linear layer over tokens: G_n = delta_n^T a_n (out x in), formed in
  // chunks of samples with batched products; LayerNorm: sum over tokens of delta * xhat; the class
  // token and the position embeddings: the gradient at the embedding output. Only signs are summed.
  bool fast_votes(const torch::Tensor& inputs, const torch::Tensor& labels, std::map<std::string, torch::Tensor>& votes) override {
    Capture capture;
    const torch::Tensor logits = run(inputs, &capture);
    torch::nn::functional::cross_entropy(logits, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)).backward();
    constexpr int64_t kChunk = 16;
    auto sign_sum = [](const torch::Tensor& per_sample) { return -torch::sign(per_sample).sum(0).to(torch::kInt32); };
    for (const auto& [name, layer] : capture.linears) {
      const torch::Tensor delta = layer.output.grad();
      if (delta.dim() == 2) {  // the head: no token dimension, one product of sign matrices
        votes[name + ".weight"] = -torch::matmul(torch::sign(delta).t(), torch::sign(layer.input)).to(torch::kInt32);
        votes[name + ".bias"] = sign_sum(delta);
        continue;
      }
      torch::Tensor weight = torch::zeros({delta.size(2), layer.input.size(2)}, delta.options().dtype(torch::kInt32));
      for (int64_t start = 0; start < delta.size(0); start += kChunk) {
        const int64_t stop = std::min<int64_t>(delta.size(0), start + kChunk);
        weight += sign_sum(torch::bmm(delta.slice(0, start, stop).transpose(1, 2), layer.input.slice(0, start, stop)));
      }
      votes[name + ".weight"] = weight;
      votes[name + ".bias"] = sign_sum(delta.sum(1));
    }
    for (const auto& [name, layer] : capture.norms) {
      const torch::Tensor delta = layer.output.grad();
      votes[name + ".weight"] = sign_sum((delta * layer.input).sum(1));
      votes[name + ".bias"] = sign_sum(delta.sum(1));
    }
    const torch::Tensor embedded = capture.embedded.grad();
    votes["cls_token"] = sign_sum(embedded.select(1, 0));
    votes["pos_embed"] = sign_sum(embedded);
    for (auto& parameter : torch::nn::Module::parameters()) parameter.mutable_grad() = torch::Tensor();
    return true;
  }

 private:
  struct Layer {
    torch::Tensor input;   // detached: the layer's input (for a LayerNorm, the normalised xhat)
    torch::Tensor output;  // with retain_grad: its gradient is delta
  };
  struct Capture {
    std::vector<std::pair<std::string, Layer>> linears;
    std::vector<std::pair<std::string, Layer>> norms;
    torch::Tensor embedded;
  };

  void refresh() {
    for (auto& [name, parameter] : parameters_) parameter = torch::nn::Module::named_parameters()[internal(name)];
  }
  static std::string internal(const std::string& name) {
    std::string text = name;
    std::replace(text.begin(), text.end(), '.', '_');
    return text;
  }
  void add(const std::string& name, const torch::Tensor& value) {
    parameters_[name] = register_parameter(internal(name), value);
    order_.push_back(name);
  }
  const torch::Tensor& p(const std::string& name) const { return parameters_.at(name); }

  torch::Tensor linear(const std::string& name, const torch::Tensor& x, Capture* capture) const {
    torch::Tensor y = torch::matmul(x, p(name + ".weight").t()) + p(name + ".bias");
    if (capture != nullptr) {
      y.retain_grad();
      capture->linears.push_back({name, {x.detach(), y}});
    }
    return y;
  }
  torch::Tensor layer_norm(const std::string& name, const torch::Tensor& x, Capture* capture) const {
    const torch::Tensor mean = x.mean(-1, true);
    const torch::Tensor normalised = (x - mean) / torch::sqrt(x.var(-1, false, true) + 1e-5);
    torch::Tensor y = normalised * p(name + ".weight") + p(name + ".bias");
    if (capture != nullptr) {
      y.retain_grad();
      capture->norms.push_back({name, {normalised.detach(), y}});
    }
    return y;
  }

  torch::Tensor run(const torch::Tensor& inputs, Capture* capture) {
    const int64_t n = inputs.size(0);
    const torch::Tensor images = inputs.reshape({n, channels_, height_, width_});
    const torch::Tensor patches = torch::nn::functional::unfold(images, torch::nn::functional::UnfoldFuncOptions(patch_).stride(patch_)).transpose(1, 2);
    torch::Tensor x = linear("patch_embed", patches, capture);
    x = torch::cat({p("cls_token").expand({n, 1, dim_}), x}, 1) + p("pos_embed");
    if (capture != nullptr) {
      x.retain_grad();
      capture->embedded = x;
    }
    const long long head_dim = dim_ / heads_;
    for (long long b = 0; b < depth_; ++b) {
      const std::string block = "blocks." + std::to_string(b);
      const torch::Tensor qkv = linear(block + ".attn.qkv", layer_norm(block + ".norm1", x, capture), capture)
                                    .reshape({n, tokens_, 3, heads_, head_dim}).permute({2, 0, 3, 1, 4});
      const torch::Tensor attention = torch::softmax(torch::matmul(qkv[0], qkv[1].transpose(-2, -1)) / std::sqrt(static_cast<double>(head_dim)), -1);
      const torch::Tensor mixed = torch::matmul(attention, qkv[2]).transpose(1, 2).reshape({n, tokens_, dim_});
      x = x + linear(block + ".attn.proj", mixed, capture);
      x = x + linear(block + ".mlp.fc2", torch::gelu(linear(block + ".mlp.fc1", layer_norm(block + ".norm2", x, capture), capture)), capture);
    }
    return linear("head", layer_norm("norm", x, capture).select(1, 0), capture);
  }

  long long channels_ = 1, height_ = 1, width_ = 1, patch_ = 1, dim_ = 1, depth_ = 1, heads_ = 1, tokens_ = 1;
  std::map<std::string, torch::Tensor> parameters_;
  std::vector<std::string> order_;
};

// A TorchScript module: forward is the archive's own; parameters keep the archive's names
// (submodule path and parameter name joined by dots, as PyTorch's state_dict names them).
// There is no fast vote path: votes take one backward pass per sample.
class TorchScriptClassifier final : public Classifier {
 public:
  explicit TorchScriptClassifier(const std::string& archive) {
    try {
      module_ = torch::jit::load(archive);
    } catch (const c10::Error& error) {
      const std::string what = error.what();
      throw InputError(archive + ": cannot load as a TorchScript archive: " + what.substr(0, what.find('\n')));
    }
    architecture_.name = "torchscript";
    for (const auto& parameter : module_.named_parameters(true)) {
      names_.push_back(parameter.name);
      parameters_.push_back(parameter.value);
      parameters_.back().requires_grad_(true);
    }
    if (names_.empty()) throw InputError(archive + ": the TorchScript module has no parameters");
  }

  torch::Tensor forward(const torch::Tensor& inputs) override {
    torch::Tensor logits = module_.forward({inputs}).toTensor();
    if (logits.dim() != 2) throw InputError("the TorchScript model returned a tensor of " + std::to_string(logits.dim()) + " dimensions; expected logits [N, classes]");
    classes_ = logits.size(1);
    return logits;
  }
  std::vector<std::pair<std::string, torch::Tensor>> parameters() override {
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (std::size_t i = 0; i < names_.size(); ++i) named.emplace_back(names_[i], parameters_[i]);
    return named;
  }
  void to_dtype(torch::ScalarType type) override { module_.to(type); }
  void to_device(const torch::Device& device) override {
    module_.to(device);
    device_ = device;
    parameters_.clear();
    for (const auto& parameter : module_.named_parameters(true)) parameters_.push_back(parameter.value);
  }
  long long classes() const override { return classes_; }
  long long input_size() const override { return -1; }
  bool fast_votes(const torch::Tensor&, const torch::Tensor&, std::map<std::string, torch::Tensor>&) override { return false; }

 private:
  torch::jit::Module module_;
  std::vector<std::string> names_;
  std::vector<torch::Tensor> parameters_;
  long long classes_ = -1;
};

}  // namespace

std::unique_ptr<Classifier> load_model(const std::string& model, const std::string& weights) {
  if (model.empty() || model == "builtin") {
    if (weights.empty()) throw InputError("--weights is required for a built-in model");
    return load_classifier(weights);
  }
  if (model.rfind("torchscript:", 0) != 0) throw InputError("unknown --model '" + model + "'; valid: builtin, torchscript:ARCHIVE");
  auto classifier = std::make_unique<TorchScriptClassifier>(model.substr(12));
  if (weights.empty()) return classifier;
  // Names must match the module's named_parameters().
  set_parameter_values(*classifier, read_parameters(*classifier, weights, "the TorchScript model"));
  return classifier;
}

Architecture parse_architecture(const std::string& name, const std::string& dims) {
  Architecture architecture;
  architecture.name = name;
  if (name != "mlp" && name != "cnn" && name != "vit")
    throw InputError("unknown architecture '" + name + "'; built in: mlp, cnn, vit (other models: --model torchscript:ARCHIVE)");
  std::stringstream text(dims);
  std::string width;
  while (std::getline(text, width, ',')) {
    if (width.empty() || width.find_first_not_of("0123456789") != std::string::npos || std::stoll(width) == 0)
      throw InputError("--dims '" + dims + "': '" + width + "' is not a positive layer width");
    architecture.dims.push_back(std::stoll(width));
  }
  if (architecture.dims.size() < 2) throw InputError("--dims '" + dims + "' needs at least an input and an output width");
  if (name == "cnn") {
    const auto& d = architecture.dims;
    if (d.size() < 5) throw InputError("--dims '" + dims + "': a cnn needs C,H,W, at least one convolution width and the classes");
    const long long blocks = static_cast<long long>(d.size()) - 4;
    if ((d[1] >> blocks) == 0 || (d[2] >> blocks) == 0)
      throw InputError("--dims '" + dims + "': " + std::to_string(blocks) + " pooling steps leave nothing of a " + std::to_string(d[1]) + "x" + std::to_string(d[2]) + " image");
  }
  if (name == "vit") {
    const auto& d = architecture.dims;
    if (d.size() != 9) throw InputError("--dims '" + dims + "': a vit needs C,H,W,patch,dim,depth,heads,mlp,classes");
    if (d[1] % d[3] != 0 || d[2] % d[3] != 0)
      throw InputError("--dims '" + dims + "': the patch size " + std::to_string(d[3]) + " does not divide the " + std::to_string(d[1]) + "x" + std::to_string(d[2]) + " image");
    if (d[4] % d[6] != 0) throw InputError("--dims '" + dims + "': the width " + std::to_string(d[4]) + " is not a multiple of the " + std::to_string(d[6]) + " heads");
  }
  return architecture;
}

Architecture architecture_of(const Metadata& metadata, const std::string& path) {
  const auto arch = metadata.find("gradfix.arch");
  if (arch == metadata.end())
    throw InputError(path + ": no gradfix.arch in the file's metadata; create weights with `gradfix init` or add it with the architecture's hyper-parameters" +
                     (is_directory(path) ? std::string(" (a Hugging Face model directory needs its config.json, which " + path + " lacks)") : ""));
  if (arch->second == "torchscript")
    throw InputError(path + ": weights of a TorchScript model; pass --model torchscript:ARCHIVE with them");
  const auto dims = metadata.find("gradfix." + arch->second + ".dims");
  if (dims == metadata.end()) throw InputError(path + ": metadata has gradfix.arch = " + arch->second + " but no gradfix." + arch->second + ".dims");
  return parse_architecture(arch->second, dims->second);
}

Metadata metadata_of(const Architecture& architecture) {
  if (architecture.name == "torchscript") return {{"gradfix.arch", "torchscript"}};
  return {{"gradfix.arch", architecture.name}, {"gradfix." + architecture.name + ".dims", join(architecture.dims)}};
}

std::unique_ptr<Classifier> make_classifier(const Architecture& architecture, std::uint64_t seed) {
  torch::manual_seed(seed);
  if (architecture.name == "cnn") return std::make_unique<Cnn>(architecture);
  if (architecture.name == "vit") return std::make_unique<Vit>(architecture);
  return std::make_unique<Mlp>(architecture);
}

std::map<std::string, std::vector<float>> read_parameters(Classifier& model, const std::string& path, const std::string& whose) {
  const auto reader = open_reader(path);
  std::vector<std::string> missing;
  std::map<std::string, std::vector<float>> values;
  for (auto& [name, parameter] : model.parameters()) {
    const TensorInfo* info = reader->find(name);
    if (info == nullptr) {
      missing.push_back(name);
      continue;
    }
    const std::vector<long long> expected(parameter.sizes().begin(), parameter.sizes().end());
    if (info->shape != expected)
      throw InputError(path + ": tensor '" + name + "': shape " + format_shape(info->shape) + " in the file, " + whose + " needs " +
                       format_shape(expected));
    values[name] = reader->read_f32(name);
  }
  if (!missing.empty())
    throw InputError(path + " lacks " + std::to_string(missing.size()) + " parameter(s) of " + whose + ": " + format_name_list(missing));
  return values;
}

std::unique_ptr<Classifier> load_classifier(const std::string& path) {
  auto model = make_classifier(architecture_of(open_reader(path)->metadata(), path), 0);
  set_parameter_values(*model, read_parameters(*model, path, "the architecture"));
  return model;
}

std::unique_ptr<TensorWriter> write_classifier(Classifier& model, const std::string& path, Metadata extra) {
  std::vector<TensorInfo> layout;
  for (auto& [name, parameter] : model.parameters())
    layout.push_back({name, DType::kF32, std::vector<long long>(parameter.sizes().begin(), parameter.sizes().end())});
  Metadata metadata = metadata_of(model.architecture());
  metadata.insert(extra.begin(), extra.end());
  auto writer = open_writer(path, layout, metadata);
  for (auto& [name, parameter] : model.parameters()) {
    const torch::Tensor values = parameter.detach().to(torch::kCPU).to(torch::kFloat32).contiguous();
    writer->write_f32(name, 0, values.data_ptr<float>(), values.numel());
  }
  writer->finish();
  return writer;
}

void save_classifier(Classifier& model, const std::string& path, Metadata extra) { write_classifier(model, path, std::move(extra))->publish(); }

std::map<std::string, std::vector<float>> parameter_values(Classifier& model) {
  std::map<std::string, std::vector<float>> values;
  for (auto& [name, parameter] : model.parameters()) {
    const torch::Tensor flat = parameter.detach().to(torch::kCPU).to(torch::kFloat32).contiguous().reshape({-1});
    values[name].assign(flat.data_ptr<float>(), flat.data_ptr<float>() + flat.numel());
  }
  return values;
}

void set_parameter_values(Classifier& model, const std::map<std::string, std::vector<float>>& values) {
  torch::NoGradGuard no_grad;
  for (auto& [name, parameter] : model.parameters()) {
    const auto found = values.find(name);
    if (found == values.end()) continue;
    parameter.copy_(torch::from_blob(const_cast<float*>(found->second.data()), parameter.sizes(), torch::kFloat32));
  }
}

torch::Tensor inputs_tensor(const Dataset& data, const torch::Device& device) {
  std::vector<int64_t> shape = {data.size()};
  shape.insert(shape.end(), data.sample_shape.begin(), data.sample_shape.end());
  return torch::from_blob(const_cast<float*>(data.inputs.data()), shape, torch::kFloat32).to(torch::TensorOptions().device(device), false, true);
}

torch::Tensor labels_tensor(const Dataset& data, const torch::Device& device) {
  return torch::from_blob(const_cast<long long*>(data.labels.data()), {data.size()}, torch::kInt64).to(torch::TensorOptions().device(device), false, true);
}

torch::Device parse_device(const std::string& text, int local_rank) {
  if (text == "cpu") return torch::kCPU;
  if (text != "cuda" && text.rfind("cuda:", 0) != 0) throw InputError("unknown --device '" + text + "'; valid: cpu, cuda, cuda:N");
  if (!torch::cuda::is_available())
    throw InputError("--device " + text + ": no CUDA device is usable here (this LibTorch build has no CUDA, or no GPU is visible); use --device cpu");
  const auto count = static_cast<int>(torch::cuda::device_count());
  int index = local_rank % count;
  if (text.size() > 5) {
    const std::string number = text.substr(5);
    if (number.empty() || number.find_first_not_of("0123456789") != std::string::npos) throw InputError("--device " + text + ": bad device index");
    index = std::stoi(number);
    if (index >= count) throw InputError("--device " + text + ": only " + std::to_string(count) + " CUDA device(s) are visible");
  }
  return {torch::kCUDA, static_cast<torch::DeviceIndex>(index)};
}

void check_compatible(Classifier& model, const Dataset& data, const std::string& what) {
  if (model.input_size() < 0) {
    // A TorchScript model states no input size: one forward pass on the first sample tells.
    try {
      torch::NoGradGuard no_grad;
      model.forward(inputs_tensor(data.subset({0}), model.device()));
    } catch (const Error&) {
      throw;
    } catch (const std::exception& error) {  // c10::Error, or the interpreter's JITException
      const std::string text = error.what();
      throw InputError(what + ": samples of shape " + format_shape(data.sample_shape) + " do not fit the TorchScript model: " + text.substr(0, text.find('\n')));
    }
  } else if (data.sample_size() != model.input_size())
    throw InputError(what + ": samples of shape " + format_shape(data.sample_shape) + " (" + std::to_string(data.sample_size()) +
                     " values) do not fit the model's input of " + std::to_string(model.input_size()) + " values");
  if (data.classes > model.classes())
    throw InputError(what + ": labels go up to " + std::to_string(data.classes - 1) + " but the model has " +
                     std::to_string(model.classes()) + " classes");
}

std::map<std::string, torch::Tensor> loop_votes(Classifier& model, const torch::Tensor& inputs, const torch::Tensor& labels) {
  std::map<std::string, torch::Tensor> votes;
  std::vector<torch::Tensor> parameters;
  for (auto& [name, parameter] : model.parameters()) {
    votes[name] = torch::zeros(parameter.sizes(), parameter.options().dtype(torch::kInt32));
    parameters.push_back(parameter);
  }
  for (int64_t n = 0; n < inputs.size(0); ++n) {
    const torch::Tensor loss = torch::nn::functional::cross_entropy(model.forward(inputs.slice(0, n, n + 1)), labels.slice(0, n, n + 1));
    const auto grads = torch::autograd::grad({loss}, parameters);
    std::size_t i = 0;
    for (auto& [name, parameter] : model.parameters()) votes[name] += torch::sign(-grads[i++]).to(torch::kInt32);
  }
  return votes;
}

std::map<std::string, torch::Tensor> gradient_sums(Classifier& model, const torch::Tensor& inputs, const torch::Tensor& labels) {
  std::vector<torch::Tensor> parameters;
  for (auto& [name, parameter] : model.parameters()) parameters.push_back(parameter);
  const torch::Tensor loss = torch::nn::functional::cross_entropy(model.forward(inputs), labels,
                                                                  torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  const auto grads = torch::autograd::grad({loss}, parameters);
  std::map<std::string, torch::Tensor> sums;
  std::size_t i = 0;
  for (auto& [name, parameter] : model.parameters()) sums[name] = (-grads[i++]).to(torch::kFloat64);
  return sums;
}

Evaluation evaluate(Classifier& model, const Dataset& data, long long batch) {
  torch::NoGradGuard no_grad;
  const torch::Tensor inputs = inputs_tensor(data, model.device()), labels = labels_tensor(data, model.device());
  double loss = 0.0;
  long long correct = 0;
  for (int64_t start = 0; start < data.size(); start += batch) {
    const int64_t stop = std::min<int64_t>(data.size(), start + batch);
    const torch::Tensor logits = model.forward(inputs.slice(0, start, stop));
    const torch::Tensor target = labels.slice(0, start, stop);
    loss += torch::nn::functional::cross_entropy(logits, target, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)).item<double>();
    correct += logits.argmax(1).eq(target).sum().item<int64_t>();
  }
  return {static_cast<double>(correct) / static_cast<double>(data.size()), loss / static_cast<double>(data.size())};
}

}  // namespace gradfix
