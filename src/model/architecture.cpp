#include "architecture.hpp"

#include <sys/stat.h>

#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "gradfix/core/error.hpp"

namespace gradfix {
namespace {

// Function-local, so that registrations from other files' static objects find it constructed.
std::map<std::string, ArchitectureRegistration::Factory>& registry() {
  static std::map<std::string, ArchitectureRegistration::Factory> factories;
  return factories;
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

Batch Batch::slice(int64_t begin, int64_t end) const {
  auto cut = [&](const torch::Tensor& tensor) { return tensor.defined() ? tensor.slice(0, begin, end) : tensor; };
  return {cut(inputs), cut(labels), cut(mask)};
}

ArchitectureRegistration::ArchitectureRegistration(const std::vector<std::string>& model_types, Factory factory) {
  for (const auto& type : model_types) registry()[type] = factory;
}

bool is_registered_architecture(const std::string& model_type) { return registry().count(model_type) > 0; }

std::unique_ptr<LayeredModel> open_layered_model(const std::string& directory) {
  const std::string path = directory + "/config.json";
  const auto config = nlohmann::json::parse(read_config_text(path), nullptr, false, false);
  if (!config.is_object()) throw InputError(path + ": not a JSON object");
  const auto type = config.find("model_type");
  if (type == config.end() || !type->is_string()) throw InputError(path + ": \"model_type\" is missing or not a string");
  const auto found = registry().find(type->get<std::string>());
  if (found == registry().end()) {
    std::string known;
    for (const auto& [name, factory] : registry()) known += (known.empty() ? "" : ", ") + name;
    throw InputError(path + ": \"model_type\": \"" + type->get<std::string>() + "\" is not an architecture gradfix implements (" + known + ")");
  }
  return found->second(directory);
}

}  // namespace gradfix
