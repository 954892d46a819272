#include "common.hpp"

#include <cmath>
#include <sstream>

#include "gradfix/cli/cli.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/selection.hpp"

namespace gradfix {
namespace commands {

OutputOptions parse_output(const Options& values) {
  OutputOptions output;
  output.include = values.texts("include");
  output.exclude = values.texts("exclude");
  if (values.has("out-dtype")) {
    const std::string text = values.text("out-dtype");
    const auto dtype = parse_float_dtype(text);
    if (!dtype)
      throw InputError("unknown --out-dtype '" + escaped_name(text) +
                       "'; valid: F64, F32, F16, BF16, F8_E4M3, F8_E5M2 (or PyTorch's names: float32, bfloat16, ...); "
                       "integer tensors keep their dtype");
    output.out_dtype = *dtype;
  }
  output.allow_nonfinite = values.flag("allow-nonfinite");
  output.force = values.flag("force");
  output.max_shard_bytes = parse_byte_size(values.text("max-shard-size"), "--max-shard-size");
  return output;
}

MaskOptions parse_mask_options(const Options& values) {
  MaskOptions mask;
  mask.beta = values.number("beta");
  mask.gamma = values.number("gamma");
  mask.c = values.number("soft-c");
  mask.seed = values.count("seed");
  const std::string input = values.text("soft-input");
  if (input != "sign" && input != "raw") throw InputError("unknown --soft-input '" + input + "'; valid: sign|raw");
  mask.raw_soft_input = input == "raw";
  return mask;
}

std::vector<double> parse_numbers(const std::string& text, const std::string& key) {
  std::vector<double> numbers;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    const auto first = item.find_first_not_of(" \t"), last = item.find_last_not_of(" \t");
    numbers.push_back(parse_number(key, first == std::string::npos ? "" : item.substr(first, last - first + 1)));
    if (!std::isfinite(numbers.back())) throw InputError("--" + key + ": every value must be finite, got '" + item + "'");
  }
  if (numbers.empty()) throw InputError("--" + key + " is empty");
  return numbers;
}

const std::vector<OptionSpec>& data_options() {
  static const std::vector<OptionSpec> options = {
      {"weights", T::kText, "",
       "model weights, or a Hugging Face model directory (for torchscript: optional, replacing the archive's parameters by name)"},
      {"data", T::kText, "", "dataset: FILE.h5 (inputs, labels), an IDX '*-images-idx3-ubyte[.gz]' file, or DIR:SPLIT"},
      {"transform", T::kText, "none",
       "input shift applied to the data: none|invert|rotate90|rotate:DEG|blur:SIGMA|contrast:F|noise:SIGMA, joined by +"}};
  return options;
}

const std::vector<OptionSpec>& shot_options() {
  static const std::vector<OptionSpec> options = {
      {"indices", T::kText, "", "use exactly these samples: a file of indices (instead of --shots-per-class)"},
      {"num-batches", T::kInteger, "0", "use the first N batches of a seeded shuffle (instead of --shots-per-class)"},
      {"batch-size", T::kInteger, "32", "batch size for --num-batches"},
      {"selection", T::kText, "random", "how the K shots per class are picked: random|coreset|kmedoids|herding (docs/cli.md)"},
      {"selection-features", T::kText, "", "features [N, D] for coreset|kmedoids|herding (default: the model's own embedding)"},
      {"save-indices", T::kText, "", "write the chosen shots' indices here (the format --indices reads)"},
  };
  return options;
}

const OptionSpec& strict_config_option() {
  static const OptionSpec option = {"strict-config", T::kFlag, "",
                                    "refuse config.json keys gradfix does not know (default: name them in a notice and go on; keys that "
                                    "change the math are always read or refused)"};
  return option;
}

std::string weights_of(const Options& values, const std::string& key) {
  const bool torchscript = values.text("model").rfind("torchscript:", 0) == 0;
  return torchscript && !values.has(key) ? std::string() : values.required(key);
}

DataOptions data_of(const Options& values, const std::string& key) { return DataOptions{values.required(key), values.text("transform")}; }

ShotSelection selection_of(const Options& values) {
  ShotSelection selection;
  if (values.has("indices")) selection.indices_file = values.text("indices");
  selection.num_batches = values.integer("num-batches");
  selection.batch_size = values.integer("batch-size");
  selection.strategy = shot_strategy_name(parse_shot_strategy(values.text("selection")));
  if (values.has("selection-features")) selection.features_file = values.text("selection-features");
  if (values.has("save-indices")) selection.save_indices = values.text("save-indices");
  return selection;
}

std::vector<OptionSpec> joined(std::vector<OptionSpec> first, const std::vector<OptionSpec>& second) {
  first.insert(first.end(), second.begin(), second.end());
  return first;
}

}  // namespace commands
}  // namespace gradfix
