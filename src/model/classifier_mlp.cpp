#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "classifier_builtin.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

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

  torch::Tensor features(const torch::Tensor& inputs) override {
    torch::Tensor x = inputs.reshape({inputs.size(0), -1});
    for (std::size_t i = 0; i + 1 < layers_.size(); ++i) x = torch::relu(layers_[i]->forward(x));
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
      outputs.push_back(z);
      x = i + 1 < layers_.size() ? torch::relu(z) : z;
    }
    // The gradients at the layers' outputs only: the parameters' own (batched) gradients, as
    // much arithmetic again, are never formed.
    const auto deltas = torch::autograd::grad(
        {torch::nn::functional::cross_entropy(x, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))}, outputs);
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const torch::Tensor delta_signs = torch::sign(deltas[i]);
      const torch::Tensor input_signs = torch::sign(activations[i]);
      // Sums of +-1 and 0 in fp32 are exact integers up to 2^24 samples.
      votes["layers." + std::to_string(i) + ".weight"] = -torch::matmul(delta_signs.t(), input_signs).to(torch::kInt32);
      votes["layers." + std::to_string(i) + ".bias"] = -delta_signs.sum(0).to(torch::kInt32);
    }
    return true;
  }

 private:
  std::vector<torch::nn::Linear> layers_;
};

const ClassifierRegistration kMlp("mlp", [](const std::vector<long long>&, const std::string&) {},
                                   [](const Architecture& architecture) { return std::unique_ptr<Classifier>(new Mlp(architecture)); });

}  // namespace
}  // namespace gradfix
