#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "classifier_builtin.hpp"
#include "conv_votes.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

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

  torch::Tensor forward(const torch::Tensor& inputs) override { return head_->forward(features(inputs)); }
  torch::Tensor features(const torch::Tensor& inputs) override {
    torch::Tensor x = inputs.reshape({inputs.size(0), channels_, height_, width_});
    for (auto& conv : convs_) x = torch::max_pool2d(torch::relu(conv->forward(x)), 2);
    return x.flatten(1);
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

  // Per-sample votes from one batched forward pass. On the CPU the convolutions' votes come from
  // the pooled windows' argmax (conv_votes.hpp: a quarter of the dense products, and the backward
  // pass is formed by hand, so nothing is computed twice); on other devices from batched dense
  // products. The head is a Linear layer: one product of sign matrices, as in the MLP.
  bool fast_votes(const torch::Tensor& inputs, const torch::Tensor& labels, std::map<std::string, torch::Tensor>& votes) override {
    if (inputs.device().is_cpu() && inputs.scalar_type() == torch::kFloat) return sparse_votes(inputs, labels, votes);
    return batched_votes(inputs, labels, votes);
  }

 private:
  // The CPU path, in chunks of samples: a chunk's activations stay in the cache, and its
  // temporaries (a few MB at most) are reused from the heap by the next chunk instead of being
  // mapped afresh, which cost more page faults than the arithmetic they hold.
  bool sparse_votes(const torch::Tensor& inputs, const torch::Tensor& labels, std::map<std::string, torch::Tensor>& votes) {
    torch::NoGradGuard no_grad;
    for (auto& [name, parameter] : parameters()) votes[name] = torch::zeros(parameter.sizes(), parameter.options().dtype(torch::kInt32));
    constexpr int64_t kChunk = 32;
    for (int64_t start = 0; start < inputs.size(0); start += kChunk) {
      const int64_t stop = std::min<int64_t>(inputs.size(0), start + kChunk);
      add_sparse_votes(inputs.slice(0, start, stop), labels.slice(0, start, stop), votes);
    }
    return true;
  }

  // One chunk. The forward pass keeps each block's input, pooled output and argmax; the backward
  // pass starts from the cross entropy's gradient softmax - one_hot (summed over samples, so each
  // row is that sample's own gradient) and runs block by block, adding to `votes`.
  void add_sparse_votes(const torch::Tensor& inputs, const torch::Tensor& labels, std::map<std::string, torch::Tensor>& votes) {
    const int64_t samples = inputs.size(0);
    std::vector<torch::Tensor> block_inputs, pooled, argmaxes;
    torch::Tensor x = inputs.reshape({samples, channels_, height_, width_}).contiguous();
    for (auto& conv : convs_) {
      block_inputs.push_back(x);
      const int64_t in = x.size(1), height = x.size(2), width = x.size(3), out_channels = conv->weight.size(0);
      const torch::Tensor out = torch::empty({samples, out_channels, height / 2, width / 2}, x.options());
      const torch::Tensor argmax = torch::empty(out.sizes(), x.options().dtype(torch::kInt32));
      if (in == 1) {
        // With one input channel LibTorch 1.13's convolutions are slow (oneDNN's 0.037 ms per
        // 28x28 image and 16 outputs, its unfold-and-multiply kernel 0.006-0.013); a direct one
        // fused with the pooling never writes the full-size output.
        const torch::Tensor weight = conv->weight.contiguous(), bias = conv->bias.contiguous();
        conv3x3_relu_max_pool2_one_channel(x.data_ptr<float>(), samples, height, width, weight.data_ptr<float>(), bias.data_ptr<float>(),
                                           out_channels, out.data_ptr<float>(), argmax.data_ptr<int32_t>());
      } else {
        const torch::Tensor z = torch::conv2d(x, conv->weight, conv->bias, 1, 1).contiguous();
        relu_max_pool2(z.data_ptr<float>(), samples * out_channels, height, width, out.data_ptr<float>(), argmax.data_ptr<int32_t>());
      }
      pooled.push_back(out);
      argmaxes.push_back(argmax);
      x = out;
    }
    const torch::Tensor flat = x.flatten(1);
    const torch::Tensor logits = head_->forward(flat);
    const torch::Tensor delta = torch::softmax(logits, 1) - torch::one_hot(labels, classes()).to(logits.scalar_type());
    const torch::Tensor delta_signs = torch::sign(delta);
    votes["head.weight"] -= torch::matmul(delta_signs.t(), torch::sign(flat)).to(torch::kInt32);
    votes["head.bias"] -= delta_signs.sum(0).to(torch::kInt32);
    torch::Tensor gradient = torch::matmul(delta, head_->weight).view_as(x).contiguous();  // at the last block's pooled outputs
    for (std::size_t i = convs_.size(); i-- > 0;) {
      const torch::Tensor weight = convs_[i]->weight.contiguous();
      const torch::Tensor& weight_votes = votes.at("convs." + std::to_string(i) + ".weight");
      const torch::Tensor& bias_votes = votes.at("convs." + std::to_string(i) + ".bias");
      const torch::Tensor input_gradient = i > 0 ? torch::empty_like(block_inputs[i]) : torch::Tensor();
      const ConvBlockShape shape{block_inputs[i].size(1), weight.size(0), block_inputs[i].size(2), block_inputs[i].size(3)};
      const ConvBlockSample first{block_inputs[i].data_ptr<float>(), pooled[i].data_ptr<float>(), gradient.data_ptr<float>(),
                                  argmaxes[i].data_ptr<int32_t>(), i > 0 ? input_gradient.data_ptr<float>() : nullptr};
      conv3x3_votes(shape, samples, first, weight.data_ptr<float>(), kCancellationTolerance, weight_votes.data_ptr<int32_t>(),
                    bias_votes.data_ptr<int32_t>());
      gradient = input_gradient;
    }
  }

  // Other devices. A convolution's per-sample weight gradient sums over positions p: G_n = delta_n
  // P_n^T, with delta_n [c_out, positions] the output gradient and P_n [c_in * 9, positions] the
  // unfolded input patches. Positions make the sign of the sum not factor, so the products are
  // formed per sample (batched, in chunks of samples) and only their signs are summed.
  bool batched_votes(const torch::Tensor& inputs, const torch::Tensor& labels, std::map<std::string, torch::Tensor>& votes) {
    std::vector<torch::Tensor> conv_inputs, conv_outputs;
    torch::Tensor x = inputs.reshape({inputs.size(0), channels_, height_, width_});
    for (auto& conv : convs_) {
      conv_inputs.push_back(x.detach());
      torch::Tensor z = conv->forward(x);
      conv_outputs.push_back(z);
      x = torch::max_pool2d(torch::relu(z), 2);
    }
    const torch::Tensor flat = x.flatten(1);
    const torch::Tensor logits = head_->forward(flat);
    // The gradients at the convolutions' outputs and the logits only: the parameters' own are
    // never formed.
    std::vector<torch::Tensor> targets = conv_outputs;
    targets.push_back(logits);
    const auto deltas = torch::autograd::grad(
        {torch::nn::functional::cross_entropy(logits, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))}, targets);
    constexpr int64_t kChunk = 32;
    for (std::size_t i = 0; i < convs_.size(); ++i) {
      const torch::Tensor patches = torch::nn::functional::unfold(conv_inputs[i], torch::nn::functional::UnfoldFuncOptions(3).padding(1));
      const torch::Tensor delta = deltas[i].flatten(2);  // [N, c_out, positions]
      torch::Tensor weight_votes = torch::zeros({delta.size(1), patches.size(1)}, delta.options().dtype(torch::kInt32));
      for (int64_t start = 0; start < delta.size(0); start += kChunk) {
        const int64_t stop = std::min<int64_t>(delta.size(0), start + kChunk);
        const torch::Tensor per_sample = torch::bmm(delta.slice(0, start, stop), patches.slice(0, start, stop).transpose(1, 2));
        weight_votes -= torch::sign(per_sample).sum(0).to(torch::kInt32);
      }
      votes["convs." + std::to_string(i) + ".weight"] = weight_votes.reshape(convs_[i]->weight.sizes());
      votes["convs." + std::to_string(i) + ".bias"] = -torch::sign(without_cancelled(delta.sum(2), delta.abs().sum(2))).sum(0).to(torch::kInt32);
    }
    const torch::Tensor delta_signs = torch::sign(deltas.back());
    votes["head.weight"] = -torch::matmul(delta_signs.t(), torch::sign(flat.detach())).to(torch::kInt32);
    votes["head.bias"] = -delta_signs.sum(0).to(torch::kInt32);
    return true;
  }

  long long channels_ = 1, height_ = 1, width_ = 1;
  std::vector<torch::nn::Conv2d> convs_;
  torch::nn::Linear head_{nullptr};
};

void check_cnn(const std::vector<long long>& d, const std::string& dims) {
  if (d.size() < 5) throw InputError("--dims '" + dims + "': a cnn needs C,H,W, at least one convolution width and the classes");
  const long long blocks = static_cast<long long>(d.size()) - 4;
  if ((d[1] >> blocks) == 0 || (d[2] >> blocks) == 0)
    throw InputError("--dims '" + dims + "': " + std::to_string(blocks) + " pooling steps leave nothing of a " + std::to_string(d[1]) + "x" + std::to_string(d[2]) + " image");
}

const ClassifierRegistration kCnn("cnn", check_cnn,
                                   [](const Architecture& architecture) { return std::unique_ptr<Classifier>(new Cnn(architecture)); });

}  // namespace
}  // namespace gradfix
