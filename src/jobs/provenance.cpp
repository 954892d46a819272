// The record an output keeps of how it was made: the model card (README.md) written beside a
// directory output, and the model files carried over from the primary input.
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "file_jobs.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/model_files.hpp"
#include "gradfix/io/safetensors.hpp"

namespace gradfix {
namespace {

// One line of a markdown table cell: no newlines, no column breaks.
std::string cell(const std::string& text) {
  std::string out;
  for (char c : escaped_name(text)) {
    if (c == '|') out += "\\|";
    else out += c;
  }
  return out;
}

// The options of one operation as "key: value" rows, nested objects flattened with dots.
void option_rows(const nlohmann::json& json, const std::string& prefix, std::ostream& out) {
  for (const auto& [key, value] : json.items()) {
    const std::string name = prefix.empty() ? key : prefix + "." + key;
    if (value.is_object()) option_rows(value, name, out);
    else if (!(value.is_array() && value.empty())) out << "| " << cell(name) << " | " << cell(value.is_string() ? value.get<std::string>() : value.dump()) << " |\n";
  }
}

// The operations behind `prefix` (an output's keys, or an input's under gradfix.input.ROLE.),
// as a nested list: each input's operation and options, then its own inputs.
void provenance_list(const Metadata& metadata, const std::string& prefix, int depth, std::ostream& out) {
  std::set<std::string> roles;
  const std::string inputs = prefix + "gradfix.input.";
  for (auto it = metadata.lower_bound(inputs); it != metadata.end() && it->first.rfind(inputs, 0) == 0; ++it) {
    const std::string rest = it->first.substr(inputs.size());
    // A role is "base", "task_vector.0"...: up to the ".gradfix." or the key of its own metadata.
    const std::size_t end = rest.find(".gradfix.");
    if (end != std::string::npos) roles.insert(rest.substr(0, end));
  }
  for (const auto& role : roles) {
    const std::string key = inputs + role + ".";
    const auto operation = metadata.find(key + "gradfix.operation");
    if (operation == metadata.end()) continue;
    out << std::string(static_cast<std::size_t>(2 * depth), ' ') << "- " << cell(role) << ": `" << cell(operation->second) << "`";
    const auto options = metadata.find(key + "gradfix.options");
    if (options != metadata.end()) out << " " << cell(options->second);
    out << "\n";
    provenance_list(metadata, key, depth + 1, out);
  }
}

}  // namespace

std::string model_card(const Metadata& metadata, bool transformers_model) {
  std::ostringstream card;
  card << "---\n";
  if (transformers_model) card << "library_name: transformers\n";
  card << "tags:\n- gradfix\n";
  const auto operation = metadata.find("gradfix.operation");
  if (operation != metadata.end()) card << "- gradfix-" << cell(operation->second) << "\n";
  card << "---\n\n# Written by gradfix\n\n";
  card << "This directory was written by `gradfix " << (operation != metadata.end() ? cell(operation->second) : "") << "`";
  card << " (task vector transport by gradient-sign masking, Rinaldi et al., ICLR 2026). The same record is in the "
          "`__metadata__` of its safetensors files.\n\n| option | value |\n|---|---|\n";
  const auto options = metadata.find("gradfix.options");
  const auto json = options == metadata.end() ? nlohmann::json() : nlohmann::json::parse(options->second, nullptr, false);
  if (json.is_object()) option_rows(json, "", card);
  // Jobs without an options record (the model subcommands) keep their settings in plain keys.
  for (const auto& [key, value] : metadata)
    if (!json.is_object() && key.rfind("gradfix.", 0) == 0 && key.find('.', 8) == std::string::npos && key != "gradfix.operation")
      card << "| " << cell(key.substr(8)) << " | " << cell(value) << " |\n";
  std::ostringstream chain;
  provenance_list(metadata, "", 0, chain);
  if (!chain.str().empty()) card << "\n## How its inputs were made\n\n" << chain.str();
  return card.str();
}

void carry_model_files(const JobContext& context, const std::string& input, TensorWriter& output, const OutputOptions& options,
                       const Metadata& metadata, const CarriedFileChanges& changes) {
  if (!output.takes_files()) return;
  context.agree([&] {
    if (!context.is_root()) return;
    bool transformers_model = false;
    // The input's own model card describes the input: the output gets its own (below).
    if (!is_directory(input)) {
      output.add_file("README.md", model_card(metadata, false));
      return;
    }
    DIR* listing = ::opendir(input.c_str());
    if (listing == nullptr) throw InputError(input + ": cannot list the model directory: " + std::strerror(errno));
    std::vector<std::string> names;
    while (const dirent* entry = ::readdir(listing)) names.emplace_back(entry->d_name);
    ::closedir(listing);
    std::sort(names.begin(), names.end());
    for (const auto& name : names) {
      const bool tensors = name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0;
      if (name.empty() || name[0] == '.' || tensors || name == kSafetensorsIndexName || name == "README.md") continue;
      if (changes.dropped.count(name) || changes.files.count(name)) continue;
      // A link is followed where it stays inside the model (a Hugging Face cache snapshot is all
      // links into ../../blobs/) and refused by name where it leads elsewhere.
      const std::string from = model_file(input, name);
      struct stat status {};
      if (::stat(from.c_str(), &status) != 0 || !S_ISREG(status.st_mode)) continue;
      if (status.st_size > (256LL << 20))
        throw InputError(from + ": " + std::to_string(status.st_size) + " bytes; model files beside the tensors are refused above 256 MiB");
      std::ifstream file(from, std::ios::binary);
      std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
      if (!file.good() && !file.eof()) throw RuntimeFailure(from + ": read failed");
      if (name == "config.json" && (options.out_dtype || changes.layers || changes.vocab_size)) {
        auto config = nlohmann::json::parse(text, nullptr, false);
        if (config.is_object() && options.out_dtype) {
          const char* torch_name = torch_dtype_name(*options.out_dtype);
          for (const char* key : {"torch_dtype", "dtype"})
            if (config.contains(key)) config[key] = torch_name;
          if (!config.contains("torch_dtype") && !config.contains("dtype")) config["torch_dtype"] = torch_name;
        }
        // Stacked layers: every key transformers families use for the layer count.
        if (config.is_object() && changes.layers)
          for (const char* key : {"num_hidden_layers", "n_layer", "num_layers", "n_layers"})
            if (config.contains(key)) config[key] = *changes.layers;
        if (config.is_object() && changes.vocab_size) config["vocab_size"] = *changes.vocab_size;
        if (config.is_object()) text = config.dump(2) + "\n";
      }
      if (name == "config.json") transformers_model = true;
      output.add_file(name, text);
    }
    for (const auto& [name, text] : changes.files) output.add_file(name, text);
    output.add_file("README.md", model_card(metadata, transformers_model));
  });
}



}  // namespace gradfix
