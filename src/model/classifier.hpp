#pragma once
// Internal to the LibTorch part of gradfix: the built-in classifiers, their checkpoint names,
// and per-sample gradient-sign votes. Only the .cpp files of src/model include this header, so
// <torch/torch.h> stays out of the rest of the build.

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gradfix/io/dataset.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {

// What a weights file records in its __metadata__ so that it is self-describing:
// gradfix.arch = mlp, gradfix.mlp.dims = 784,256,10.
struct Architecture {
  std::string name = "mlp";
  std::vector<long long> dims;  // mlp: layer widths, input first
};

Architecture parse_architecture(const std::string& name, const std::string& dims);
Architecture architecture_of(const Metadata& metadata, const std::string& path);
Metadata metadata_of(const Architecture& architecture);

class Classifier {
 public:
  virtual ~Classifier() = default;
  // Inputs [N, ...sample shape] to logits [N, classes].
  virtual torch::Tensor forward(const torch::Tensor& inputs) = 0;
  // Parameters under their checkpoint names, in checkpoint order.
  virtual std::vector<std::pair<std::string, torch::Tensor>> parameters() = 0;
  virtual long long classes() const = 0;
  virtual long long input_size() const = 0;
  // Per-sample vote sums sum_n sign(-grad_n loss_n) for every parameter from one batched
  // backward pass, or false where the architecture has no fast path.
  virtual bool fast_votes(const torch::Tensor& inputs, const torch::Tensor& labels,
                          std::map<std::string, torch::Tensor>& votes) = 0;
  // Per-sample features [N, D]: the input of the last Linear layer (the penultimate
  // activations), what shot selection compares samples by; undefined for a model that has none
  // (a TorchScript archive).
  virtual torch::Tensor features(const torch::Tensor& inputs) {
    (void)inputs;
    return {};
  }
  // Moves the parameters to another floating type (float64 for numerical checks).
  virtual void to_dtype(torch::ScalarType type) = 0;
  // Moves the parameters to a device; inputs follow through inputs_tensor(data, device()).
  virtual void to_device(const torch::Device& device) = 0;
  const torch::Device& device() const { return device_; }
  const Architecture& architecture() const { return architecture_; }

 protected:
  Architecture architecture_;
  torch::Device device_{torch::kCPU};
};

std::unique_ptr<Classifier> make_classifier(const Architecture& architecture, std::uint64_t seed);
// Loads weights, checking names and shapes against the architecture; the error lists every
// mismatch.
std::unique_ptr<Classifier> load_classifier(const std::string& path);
// A model given on the command line: `model` empty (or "builtin") takes the architecture from the
// weights' metadata; "torchscript:ARCHIVE" loads a TorchScript archive exported from PyTorch,
// whose parameters are then replaced by the weights file's tensors of the same names (all of
// them must be there, with the same shapes). Without weights a TorchScript archive keeps its own.
std::unique_ptr<Classifier> load_model(const std::string& model, const std::string& weights);
void save_classifier(Classifier& model, const std::string& path, Metadata extra = {});
// Writes and finishes the weights under temporary names; publish() puts them in place.
std::unique_ptr<TensorWriter> write_classifier(Classifier& model, const std::string& path, Metadata extra = {});
// For every parameter of the model, the tensor of the same name in `path`: one error lists every
// missing name; a shape mismatch names both shapes. `whose` says what the shapes belong to.
std::map<std::string, std::vector<float>> read_parameters(Classifier& model, const std::string& path, const std::string& whose);

// Copies of the parameters as fp32 vectors, and back.
std::map<std::string, std::vector<float>> parameter_values(Classifier& model);
void set_parameter_values(Classifier& model, const std::map<std::string, std::vector<float>>& values);
// Sets every parameter to base + alpha * delta (float arithmetic, element by element), writing
// into the parameters themselves where they are contiguous float32 on the CPU: the alpha searches
// call this for every grid point, and a copy of the model per point was most of their page faults.
void set_moved_parameters(Classifier& model, const std::map<std::string, std::vector<float>>& base,
                          const std::map<std::string, std::vector<float>>& delta, double alpha);

// Inputs of a dataset as a tensor [N, ...], labels [N], on a device.
torch::Tensor inputs_tensor(const Dataset& data, const torch::Device& device = torch::kCPU);
torch::Tensor labels_tensor(const Dataset& data, const torch::Device& device = torch::kCPU);

// "cpu", "cuda" or "cuda:N". "cuda" alone picks the GPU from the rank on the node. InputError
// when LibTorch has no CUDA or no GPU is visible: never a quiet fall back to the CPU.
torch::Device parse_device(const std::string& text, int local_rank);
void check_compatible(Classifier& model, const Dataset& data, const std::string& what);

// Vote sums with one backward pass per sample: the generic reference.
std::map<std::string, torch::Tensor> loop_votes(Classifier& model, const torch::Tensor& inputs, const torch::Tensor& labels);
// Sum over samples of -grad (mean mode), in fp64.
std::map<std::string, torch::Tensor> gradient_sums(Classifier& model, const torch::Tensor& inputs, const torch::Tensor& labels);

struct Evaluation {
  double accuracy = 0.0;
  double loss = 0.0;
};
Evaluation evaluate(Classifier& model, const Dataset& data, long long batch = 1000);

}  // namespace gradfix
