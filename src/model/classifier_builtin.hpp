#pragma once
// Internal to the LibTorch part: what each built-in classifier's own file needs. An architecture
// (mlp, cnn, vit) lives in one file, classifier_NAME.cpp, and registers its name, the check of its
// --dims and its constructor here; classifier.cpp knows none of them by name.

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "architecture.hpp"
#include "classifier.hpp"

namespace gradfix {

// A built-in model: a Classifier that is also a torch::nn::Module, moved as one.
class BuiltInClassifier : public Classifier, public torch::nn::Module {
 public:
  void to_dtype(torch::ScalarType type) override { torch::nn::Module::to(type); }
  void to_device(const torch::Device& device) override {
    torch::nn::Module::to(device);
    device_ = device;
  }
};

struct ClassifierRegistration {
  // Throws InputError naming `text` (the --dims as given) when the widths do not fit.
  using Check = std::function<void(const std::vector<long long>& dims, const std::string& text)>;
  using Make = std::function<std::unique_ptr<Classifier>(const Architecture& architecture)>;
  ClassifierRegistration(const std::string& name, Check check, Make make);
};

// A TorchScript archive exported from PyTorch (classifier_torchscript.cpp).
std::unique_ptr<Classifier> load_torchscript(const std::string& archive);

}  // namespace gradfix
