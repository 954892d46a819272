#include "architecture.hpp"

#include <algorithm>

#include <sys/stat.h>

#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>

#include "gradfix/io/model_files.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

struct Registered {
  ModelInputs inputs = ModelInputs::kTokens;
  ArchitectureRegistration::Factory factory;
};

// Function-local, so that registrations from other files' static objects find it constructed.
std::map<std::string, Registered>& registry() {
  static std::map<std::string, Registered> architectures;
  return architectures;
}

}  // namespace

bool is_model_directory(const std::string& path) {
  struct stat status {};
  if (::stat(path.c_str(), &status) != 0 || !S_ISDIR(status.st_mode)) return false;
  return ::stat((path + "/config.json").c_str(), &status) == 0;
}

std::string read_config_text(const std::string& path) {
  // The size is bounded before anything is read: a config comes from strangers.
  struct stat status {};
  if (::stat(path.c_str(), &status) != 0) throw InputError(path + ": cannot open (a Hugging Face model directory holds config.json)");
  if (!S_ISREG(status.st_mode)) throw InputError(path + ": not a regular file");
  if (status.st_size > (16LL << 20)) throw InputError(path + ": " + std::to_string(status.st_size) + " bytes is too large for a config (16 MiB at most)");
  std::ifstream file(path, std::ios::binary);
  if (!file) throw InputError(path + ": cannot open");
  std::string text;
  text.resize(static_cast<std::size_t>(status.st_size));
  file.read(&text[0], static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<std::size_t>(file.gcount()));
  return text;
}

torch::Tensor recorded_linear(const Parameters& p, const std::string& name, const torch::Tensor& x, bool bias,
                              GradientRecorder* recorder) {
  torch::Tensor out = torch::nn::functional::linear(x, p.at(name + ".weight"), bias ? p.at(name + ".bias") : torch::Tensor());
  if (recorder != nullptr && out.requires_grad()) {
    out.retain_grad();
    recorder->add({name + ".weight", Capture::Kind::kLinearWeight, x.detach(), out});
    if (bias) recorder->add({name + ".bias", Capture::Kind::kBias, torch::Tensor(), out});
  }
  return out;
}

Batch Batch::slice(int64_t begin, int64_t end) const {
  auto cut = [&](const torch::Tensor& tensor) { return tensor.defined() ? tensor.slice(0, begin, end) : tensor; };
  return {cut(inputs), cut(labels), cut(mask), token_rows};
}

int64_t Batch::input_index(int64_t token) const {
  if (!token_rows.defined()) return token;
  const int64_t* rows = token_rows.data_ptr<int64_t>();
  const int64_t* end = rows + token_rows.numel();
  const int64_t* found = std::lower_bound(rows, end, token);
  return found != end && *found == token ? found - rows : -1;
}

ArchitectureRegistration::ArchitectureRegistration(const std::vector<std::string>& model_types, ModelInputs inputs, Factory factory) {
  for (const auto& type : model_types) registry()[type] = {inputs, factory};
}

bool is_registered_architecture(const std::string& model_type) { return registry().count(model_type) > 0; }

std::string registered_architectures() {
  std::string known;
  for (const auto& entry : registry()) known += (known.empty() ? "" : ", ") + entry.first;
  return known;
}

void check_against_model(const TensorReader& reader, const LayeredModel& model, bool partial) {
  std::vector<std::string> missing, extra;
  std::string shapes;
  std::set<std::string> expected;
  for (const auto& tensor : model.layout()) {
    expected.insert(tensor.name);
    const TensorInfo* found = reader.find(tensor.name);
    if (found == nullptr) {
      if (!partial) missing.push_back(tensor.name);
    } else if (found->shape != tensor.shape) {
      shapes += std::string(shapes.empty() ? "" : "; ") + "'" + escaped_name(tensor.name) + "' is " + format_shape(found->shape) +
                ", the config needs " + format_shape(tensor.shape);
    } else if (found->dtype != DType::kF32 && found->dtype != DType::kBF16 && found->dtype != DType::kF16 && found->dtype != DType::kF64) {
      shapes += std::string(shapes.empty() ? "" : "; ") + "'" + escaped_name(tensor.name) + "' is " + dtype_name(found->dtype) + ", not a float type";
    }
  }
  for (const auto& tensor : reader.tensors()) {
    if (expected.count(tensor.name)) continue;
    if (model.ignores(tensor.name)) continue;
    extra.push_back(tensor.name);
  }
  if (partial && missing.empty() && extra.empty() && shapes.empty()) {
    bool any = false;
    for (const auto& name : expected) any = any || reader.find(name) != nullptr;
    if (!any) throw InputError(reader.path() + " holds none of the tensors of " + model.directory() + " (" + model.model_type() + ")");
  }
  std::string message;
  if (!missing.empty()) message += std::to_string(missing.size()) + " tensor(s) missing: " + format_name_list(missing);
  if (!extra.empty()) message += std::string(message.empty() ? "" : "; ") + std::to_string(extra.size()) + " tensor(s) the config does not have: " + format_name_list(extra);
  if (!shapes.empty()) message += std::string(message.empty() ? "" : "; ") + shapes;
  if (message.empty()) return;
  // The model's own checkpoint is named by its directory; anything else by its path.
  const bool own = reader.path() == model.directory() || reader.path().rfind(model.directory() + "/", 0) == 0;
  throw InputError((own ? model.directory() + " does not match its config.json" : reader.path() + " does not match " + model.directory() + "/config.json") +
                   " (" + model.model_type() + "): " + message);
}

bool is_image_model_directory(const std::string& path) {
  return is_model_directory(path) && model_directory_inputs(path) == ModelInputs::kImages;
}

std::string config_model_type(const std::string& text, const std::string& path) {
  const auto config = nlohmann::json::parse(text, nullptr, false, false);
  if (!config.is_object()) throw InputError(path + ": not a JSON object");
  const auto type = config.find("model_type");
  if (type == config.end() || !type->is_string())
    throw InputError(path + ": \"model_type\" is missing or not a string (gradfix implements " + registered_architectures() + ")");
  return type->get<std::string>();
}

std::unique_ptr<LayeredModel> layered_model_from_config(const ModelConfigSource& source) {
  const std::string type = config_model_type(source.text, source.path);
  const auto found = registry().find(type);
  if (found == registry().end())
    throw InputError(source.path + ": \"model_type\": \"" + type + "\" is not an architecture gradfix implements (" + registered_architectures() + ")");
  return found->second.factory(source);
}

std::unique_ptr<LayeredModel> open_layered_model(const std::string& directory, bool strict_config) {
  const std::string path = model_file(directory, "config.json");
  return layered_model_from_config({directory, path, read_config_text(path), strict_config});
}

ModelInputs model_directory_inputs(const std::string& directory) {
  try {
    const std::string path = model_file(directory, "config.json");
    const auto found = registry().find(config_model_type(read_config_text(path), path));
    return found == registry().end() ? ModelInputs::kTokens : found->second.inputs;
  } catch (const InputError&) {
    return ModelInputs::kTokens;
  }
}

}  // namespace gradfix
