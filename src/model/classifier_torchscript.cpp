#include <torch/script.h>

#include <string>
#include <vector>

#include "classifier_builtin.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

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

std::unique_ptr<Classifier> load_torchscript(const std::string& archive) { return std::make_unique<TorchScriptClassifier>(archive); }

}  // namespace gradfix
