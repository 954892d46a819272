#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "classifier_builtin.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

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
  torch::Tensor features(const torch::Tensor& inputs) override { return run(inputs, nullptr, true); }

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
    // The gradients at the captured outputs only: the parameters' own (batched) gradients, as
    // much arithmetic as the per-sample products below, are never formed.
    std::vector<torch::Tensor> targets;
    for (const auto& [name, layer] : capture.linears) targets.push_back(layer.output);
    for (const auto& [name, layer] : capture.norms) targets.push_back(layer.output);
    targets.push_back(capture.embedded);
    const auto deltas = torch::autograd::grad(
        {torch::nn::functional::cross_entropy(logits, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))}, targets);
    std::size_t next = 0;
    constexpr int64_t kChunk = 16;
    auto sign_sum = [](const torch::Tensor& per_sample) { return -torch::sign(per_sample).sum(0).to(torch::kInt32); };
    for (const auto& [name, layer] : capture.linears) {
      const torch::Tensor& delta = deltas[next++];
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
      votes[name + ".bias"] = sign_sum(without_cancelled(delta.sum(1), delta.abs().sum(1)));
    }
    for (const auto& [name, layer] : capture.norms) {
      const torch::Tensor& delta = deltas[next++];
      votes[name + ".weight"] = sign_sum((delta * layer.input).sum(1));
      votes[name + ".bias"] = sign_sum(without_cancelled(delta.sum(1), delta.abs().sum(1)));
    }
    const torch::Tensor& embedded = deltas[next];
    votes["cls_token"] = sign_sum(embedded.select(1, 0));
    votes["pos_embed"] = sign_sum(embedded);
    return true;
  }

 private:
  struct Layer {
    torch::Tensor input;   // detached: the layer's input (for a LayerNorm, the normalised xhat)
    torch::Tensor output;  // its gradient is delta
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
    if (capture != nullptr) capture->linears.push_back({name, {x.detach(), y}});
    return y;
  }
  torch::Tensor layer_norm(const std::string& name, const torch::Tensor& x, Capture* capture) const {
    const torch::Tensor mean = x.mean(-1, true);
    const torch::Tensor normalised = (x - mean) / torch::sqrt(x.var(-1, false, true) + 1e-5);
    torch::Tensor y = normalised * p(name + ".weight") + p(name + ".bias");
    if (capture != nullptr) capture->norms.push_back({name, {normalised.detach(), y}});
    return y;
  }

  // Logits, or with `features_only` the normalised class token the head reads.
  torch::Tensor run(const torch::Tensor& inputs, Capture* capture, bool features_only = false) {
    const int64_t n = inputs.size(0);
    const torch::Tensor images = inputs.reshape({n, channels_, height_, width_});
    const torch::Tensor patches = torch::nn::functional::unfold(images, torch::nn::functional::UnfoldFuncOptions(patch_).stride(patch_)).transpose(1, 2);
    torch::Tensor x = linear("patch_embed", patches, capture);
    x = torch::cat({p("cls_token").expand({n, 1, dim_}), x}, 1) + p("pos_embed");
    if (capture != nullptr) capture->embedded = x;
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
    const torch::Tensor token = layer_norm("norm", x, capture).select(1, 0);
    return features_only ? token : linear("head", token, capture);
  }

  long long channels_ = 1, height_ = 1, width_ = 1, patch_ = 1, dim_ = 1, depth_ = 1, heads_ = 1, tokens_ = 1;
  std::map<std::string, torch::Tensor> parameters_;
  std::vector<std::string> order_;
};

void check_vit(const std::vector<long long>& d, const std::string& dims) {
  if (d.size() != 9) throw InputError("--dims '" + dims + "': a vit needs C,H,W,patch,dim,depth,heads,mlp,classes");
  if (d[1] % d[3] != 0 || d[2] % d[3] != 0)
    throw InputError("--dims '" + dims + "': the patch size " + std::to_string(d[3]) + " does not divide the " + std::to_string(d[1]) + "x" + std::to_string(d[2]) + " image");
  if (d[4] % d[6] != 0) throw InputError("--dims '" + dims + "': the width " + std::to_string(d[4]) + " is not a multiple of the " + std::to_string(d[6]) + " heads");
}

const ClassifierRegistration kVit("vit", check_vit,
                                   [](const Architecture& architecture) { return std::unique_ptr<Classifier>(new Vit(architecture)); });

}  // namespace
}  // namespace gradfix
