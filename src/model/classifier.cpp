#include "classifier.hpp"

#include "classifier_builtin.hpp"

#include "gradfix/io/atomic_file.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "gradfix/io/error.hpp"
#include "gradfix/dist/progress.hpp"

namespace gradfix {
namespace {

struct Registered {
  ClassifierRegistration::Check check;
  ClassifierRegistration::Make make;
};

// Function-local, so that the architectures' static registrations find it constructed.
std::map<std::string, Registered>& registry() {
  static std::map<std::string, Registered> architectures;
  return architectures;
}

std::string known_names() {
  std::string names;
  for (const auto& [name, entry] : registry()) names += (names.empty() ? "" : ", ") + name;
  return names;
}

std::string join(const std::vector<long long>& values) {
  std::string text;
  for (std::size_t i = 0; i < values.size(); ++i) text += (i ? "," : "") + std::to_string(values[i]);
  return text;
}

}  // namespace

ClassifierRegistration::ClassifierRegistration(const std::string& name, Check check, Make make) {
  registry()[name] = {std::move(check), std::move(make)};
}

std::unique_ptr<Classifier> load_model(const std::string& model, const std::string& weights) {
  if (model.empty() || model == "builtin") {
    if (weights.empty()) throw InputError("--weights is required for a built-in model");
    return load_classifier(weights);
  }
  if (model.rfind("torchscript:", 0) != 0) throw InputError("unknown --model '" + model + "'; valid: builtin, torchscript:ARCHIVE");
  auto classifier = load_torchscript(model.substr(12));
  if (weights.empty()) return classifier;
  // Names must match the module's named_parameters().
  set_parameter_values(*classifier, read_parameters(*classifier, weights, "the TorchScript model"));
  return classifier;
}

Architecture parse_architecture(const std::string& name, const std::string& dims) {
  Architecture architecture;
  architecture.name = name;
  const auto found = registry().find(name);
  if (found == registry().end())
    throw InputError("unknown architecture '" + name + "'; built in: " + known_names() + " (other models: --model torchscript:ARCHIVE)");
  std::stringstream text(dims);
  std::string width;
  while (std::getline(text, width, ',')) {
    if (width.empty() || width.find_first_not_of("0123456789") != std::string::npos || std::stoll(width) == 0)
      throw InputError("--dims '" + dims + "': '" + width + "' is not a positive layer width");
    architecture.dims.push_back(std::stoll(width));
  }
  if (architecture.dims.size() < 2) throw InputError("--dims '" + dims + "' needs at least an input and an output width");
  found->second.check(architecture.dims, dims);
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
  const auto found = registry().find(architecture.name);
  if (found == registry().end()) throw InputError("unknown architecture '" + architecture.name + "'; built in: " + known_names());
  return found->second.make(architecture);
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

namespace {

// A parameter overwritten with float32 values of its shape, on its device and in its dtype.
void copy_into(torch::Tensor& parameter, const std::vector<float>& values) {
  parameter.copy_(torch::from_blob(const_cast<float*>(values.data()), parameter.sizes(), torch::kFloat32));
}

}  // namespace

void set_parameter_values(Classifier& model, const std::map<std::string, std::vector<float>>& values) {
  torch::NoGradGuard no_grad;
  for (auto& [name, parameter] : model.parameters()) {
    const auto found = values.find(name);
    if (found != values.end()) copy_into(parameter, found->second);
  }
}

void set_moved_parameters(Classifier& model, const std::map<std::string, std::vector<float>>& base,
                          const std::map<std::string, std::vector<float>>& delta, double alpha) {
  torch::NoGradGuard no_grad;
  const auto factor = static_cast<float>(alpha);
  for (auto& [name, parameter] : model.parameters()) {
    const auto found = base.find(name);
    if (found == base.end()) continue;
    const std::vector<float>& from = found->second;
    const std::vector<float>& step = delta.at(name);
    if (parameter.is_cpu() && parameter.is_contiguous() && parameter.scalar_type() == torch::kFloat32) {
      float* values = parameter.data_ptr<float>();
      for (std::size_t i = 0; i < from.size(); ++i) values[i] = from[i] + factor * step[i];
      continue;
    }
    std::vector<float> moved(from);
    for (std::size_t i = 0; i < moved.size(); ++i) moved[i] += factor * step[i];
    copy_into(parameter, moved);
  }
}

namespace {

// The data set's own memory as tensors, without a copy: valid while `data` lives, and only for
// reading (from_blob needs a non-const pointer; nothing here writes through it).
torch::Tensor inputs_view(const Dataset& data) {
  std::vector<int64_t> shape = {data.size()};
  shape.insert(shape.end(), data.sample_shape.begin(), data.sample_shape.end());
  return torch::from_blob(const_cast<float*>(data.inputs.data()), shape, torch::kFloat32);
}

torch::Tensor labels_view(const Dataset& data) {
  return torch::from_blob(const_cast<long long*>(data.labels.data()), {data.size()}, torch::kInt64);
}

}  // namespace

torch::Tensor inputs_tensor(const Dataset& data, const torch::Device& device) {
  return inputs_view(data).to(torch::TensorOptions().device(device), false, true);
}

torch::Tensor labels_tensor(const Dataset& data, const torch::Device& device) {
  return labels_view(data).to(torch::TensorOptions().device(device), false, true);
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
  // On the CPU the data set's own memory is read in place (evaluation never writes its inputs);
  // a copy of a 10,000-image test set per evaluation was page faults and memory traffic.
  const bool on_cpu = model.device().is_cpu();
  const torch::Tensor inputs = on_cpu ? inputs_view(data) : inputs_tensor(data, model.device());
  const torch::Tensor labels = on_cpu ? labels_view(data) : labels_tensor(data, model.device());
  double loss = 0.0;
  long long correct = 0;
  for (int64_t start = 0; start < data.size(); start += batch) {
    const int64_t stop = std::min<int64_t>(data.size(), start + batch);
    const torch::Tensor logits = model.forward(inputs.slice(0, start, stop));
    const torch::Tensor target = labels.slice(0, start, stop);
    loss += torch::nn::functional::cross_entropy(logits, target, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)).item<double>();
    correct += logits.argmax(1).eq(target).sum().item<int64_t>();
  }
  count_progress(data.size());
  return {static_cast<double>(correct) / static_cast<double>(data.size()), loss / static_cast<double>(data.size())};
}

}  // namespace gradfix
