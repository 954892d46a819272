#include "gradfix/io/lora.hpp"

#include <re2/re2.h>

#include <cmath>
#include <map>
#include <set>

#include "gradfix/io/model_files.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/safetensors.hpp"
#include "json_input.hpp"

namespace gradfix {
namespace {

using Json = nlohmann::json;

// Bounds on what an adapter may declare before anything is allocated: a rank past this is no
// low-rank adapter, and a delta past kMaxDeltaElements is no layer of a model that exists.
constexpr long long kMaxRank = 1 << 16;
constexpr long long kMaxDeltaElements = 1LL << 40;
constexpr long long kMaxConfigBytes = 1 << 20;
constexpr const char* kPrefix = "base_model.model.";

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// One adapted module: delta = scale * B @ A, transposed for GPT-2's Conv1D layers (fan_in_fan_out)
// and for embeddings, whose weights are stored [num_embeddings, dim].
struct Module {
  std::string a_name, b_name;  // in adapter_model.safetensors
  long long rank = 0, rows = 0, columns = 0;
  bool transposed = false;
  double scale = 0.0;
};

class LoraReader final : public TensorReader {
 public:
  explicit LoraReader(const std::string& directory) : directory_(directory) {
    config_path_ = model_file(directory, "adapter_config.json");
    const std::string weights = model_file(directory, "adapter_model.safetensors");
    if (!file_exists(weights))
      throw InputError(directory + ": a PEFT adapter without adapter_model.safetensors (gradfix does not read adapter_model.bin: "
                       "pickle files can run code; convert it with safetensors first)");
    read_config();
    adapter_ = open_safetensors_reader(weights);
    if (!adapter_->unreadable().empty())
      throw InputError(weights + ": tensor '" + escaped_name(adapter_->unreadable().front().first) + "' is stored as '" +
                       escaped_name(adapter_->unreadable().front().second) + "', a dtype gradfix cannot read");
    pair_tensors();
  }

  const std::string& path() const override { return directory_; }
  const std::vector<TensorInfo>& tensors() const override { return tensors_; }
  const Metadata& metadata() const override { return metadata_; }

  void read_raw(const std::string& name, long long begin, long long count, void* target) const override {
    const auto found = modules_.find(name);
    if (found == modules_.end()) throw InputError(directory_ + ": no tensor named '" + name + "'");
    const Module& module = found->second;
    if (begin < 0 || count < 0 || begin + count > module.rows * module.columns)
      throw InputError(directory_ + ": tensor '" + name + "': elements [" + std::to_string(begin) + ", " +
                       std::to_string(begin + count) + ") requested, it has " + std::to_string(module.rows * module.columns));
    const auto& [a, b] = factors(module);
    auto* out = static_cast<float*>(target);
    const long long r = module.rank;
    // Element (i, j) of B @ A is sum_k B[i, k] A[k, j]; transposed, (i, j) is (j, i) of it. Sums
    // run in double and are rounded once, so a chunk's values do not depend on where it starts.
    for (long long e = begin; e < begin + count; ++e) {
      const long long i = e / module.columns, j = e % module.columns;
      const long long b_row = module.transposed ? j : i, a_column = module.transposed ? i : j;
      const long long a_columns = module.transposed ? module.rows : module.columns;
      double sum = 0.0;
      for (long long k = 0; k < r; ++k)
        sum += static_cast<double>(b[static_cast<std::size_t>(b_row * r + k)]) * a[static_cast<std::size_t>(k * a_columns + a_column)];
      out[e - begin] = static_cast<float>(module.scale * sum);
    }
  }

 private:
  void read_config() {
    const Json config = parse_untrusted_json(read_small_file(config_path_, kMaxConfigBytes), config_path_, "adapter config");
    if (!config.is_object()) throw InputError(config_path_ + ": not a JSON object");
    auto field = [&](const char* key) -> const Json& {
      static const Json kNull;
      return config.contains(key) ? config[key] : kNull;
    };
    const Json& type = field("peft_type");
    if (!type.is_string() || type.get<std::string>() != "LORA")
      throw InputError(config_path_ + ": peft_type is " + type.dump() + "; gradfix reads LoRA adapters (\"LORA\") only");
    // Variants whose delta is not (alpha / r) * B @ A, or that carry whole weights, are refused
    // by name rather than read wrong.
    auto refuse_if = [&](const char* key, bool set, const std::string& what) {
      if (set) throw InputError(config_path_ + ": " + key + " = " + field(key).dump() + ": " + what + " is not supported");
    };
    refuse_if("use_dora", field("use_dora").is_boolean() && field("use_dora").get<bool>(), "DoRA (a magnitude vector on top of B @ A)");
    refuse_if("lora_bias", field("lora_bias").is_boolean() && field("lora_bias").get<bool>(), "a LoRA bias");
    refuse_if("bias", field("bias").is_string() && field("bias").get<std::string>() != "none", "training biases with the adapter");
    refuse_if("modules_to_save", field("modules_to_save").is_array() && !field("modules_to_save").empty(),
              "saving whole modules beside the adapter");
    refuse_if("layer_replication", !field("layer_replication").is_null(), "layer replication");
    refuse_if("target_parameters", field("target_parameters").is_array() && !field("target_parameters").empty(),
              "LoRA on parameters (not modules)");
    const Json& r = field("r");
    if (!r.is_number_integer() || r.get<long long>() <= 0 || r.get<long long>() > kMaxRank)
      throw InputError(config_path_ + ": r is " + r.dump() + "; expected an integer in [1, " + std::to_string(kMaxRank) + "]");
    const Json& alpha = field("lora_alpha");
    if (!alpha.is_number() || !std::isfinite(alpha.get<double>()))
      throw InputError(config_path_ + ": lora_alpha is " + alpha.dump() + "; expected a finite number");
    lora_alpha_ = alpha.get<double>();
    use_rslora_ = field("use_rslora").is_boolean() && field("use_rslora").get<bool>();
    fan_in_fan_out_ = field("fan_in_fan_out").is_boolean() && field("fan_in_fan_out").get<bool>();
    const Json& patterns = field("alpha_pattern");
    if (!patterns.is_null() && !patterns.is_object()) throw InputError(config_path_ + ": alpha_pattern is not an object");
    if (patterns.is_object())
      for (const auto& [key, value] : patterns.items()) {
        if (!value.is_number() || !std::isfinite(value.get<double>()))
          throw InputError(config_path_ + ": alpha_pattern '" + escaped_name(key) + "' is " + value.dump() + ", not a finite number");
        // PEFT matches a pattern key against the end of a module's name, after a dot.
        auto pattern = std::make_shared<RE2>("(.*\\.)?(" + key + ")", RE2::Quiet);
        if (!pattern->ok()) throw InputError(config_path_ + ": alpha_pattern key '" + escaped_name(key) + "' is not a valid pattern");
        alpha_patterns_.emplace_back(pattern, value.get<double>());
      }
    Json options = {{"r", r}, {"lora_alpha", lora_alpha_}, {"use_rslora", use_rslora_}, {"fan_in_fan_out", fan_in_fan_out_}};
    for (const char* key : {"target_modules", "alpha_pattern", "rank_pattern", "base_model_name_or_path", "peft_version"})
      if (!field(key).is_null()) options[key] = field(key);
    metadata_ = {{"format", "pt"}, {"gradfix.operation", "lora"}, {"gradfix.options", options.dump()}};
  }

  double alpha_for(const std::string& module) const {
    for (const auto& [pattern, alpha] : alpha_patterns_)
      if (RE2::FullMatch(module, *pattern)) return alpha;
    return lora_alpha_;
  }

  // Pairs lora_A with lora_B per module and names each delta after the base weight it changes.
  void pair_tensors() {
    struct Half {
      const TensorInfo* a = nullptr;
      const TensorInfo* b = nullptr;
      bool embedding = false;
    };
    std::map<std::string, Half> halves;
    std::vector<std::string> unsupported;
    for (const auto& tensor : adapter_->tensors()) {
      const std::string& name = tensor.name;
      static const std::pair<const char*, int> kSuffixes[] = {
          {".lora_A.weight", 0}, {".lora_B.weight", 1}, {".lora_embedding_A", 2}, {".lora_embedding_B", 3}};
      bool matched = false;
      for (const auto& [suffix, kind] : kSuffixes) {
        if (!ends_with(name, suffix)) continue;
        Half& half = halves[name.substr(0, name.size() - std::string(suffix).size())];
        (kind % 2 == 0 ? half.a : half.b) = &tensor;
        half.embedding = kind >= 2;
        matched = true;
      }
      // PEFT saves a targeted embedding's own weight beside its adapter (in case the vocabulary
      // grew); the task vector is the adapter's change, and the base model supplies the weight.
      if (!matched && ends_with(name, ".base_layer.weight")) matched = true;
      if (!matched) unsupported.push_back(name);
    }
    if (!unsupported.empty())
      throw InputError(adapter_->path() + ": holds tensors that are not LoRA factors: " + format_name_list(unsupported) +
                       " (DoRA magnitudes, biases and saved modules are not supported)");
    for (const auto& [module_path, half] : halves) {
      const std::string where = adapter_->path() + ": module '" + escaped_name(module_path) + "'";
      if (half.a == nullptr || half.b == nullptr) throw InputError(where + " has " + (half.a ? "lora_A" : "lora_B") + " without its pair");
      if (half.a->shape.size() != 2 || half.b->shape.size() != 2)
        throw InputError(where + ": LoRA factors must be matrices, got " + format_shape(half.a->shape) + " and " +
                         format_shape(half.b->shape));
      Module module;
      module.rank = half.a->shape[0];
      if (half.b->shape[1] != module.rank)
        throw InputError(where + ": lora_A " + format_shape(half.a->shape) + " has rank " + std::to_string(module.rank) + ", lora_B " +
                         format_shape(half.b->shape) + " has " + std::to_string(half.b->shape[1]));
      if (module.rank <= 0 || module.rank > kMaxRank)
        throw InputError(where + ": rank " + std::to_string(module.rank) + " outside [1, " + std::to_string(kMaxRank) + "]");
      const long long in = half.a->shape[1], out = half.b->shape[0];
      if (in <= 0 || out <= 0 || in > kMaxDeltaElements / out)
        throw InputError(where + ": a delta of " + std::to_string(out) + " x " + std::to_string(in) + " elements is refused");
      module.transposed = half.embedding || fan_in_fan_out_;
      module.rows = module.transposed ? in : out;
      module.columns = module.transposed ? out : in;
      module.a_name = half.a->name;
      module.b_name = half.b->name;
      std::string base_module = module_path.rfind(kPrefix, 0) == 0 ? module_path.substr(std::string(kPrefix).size()) : module_path;
      const double alpha = alpha_for(base_module);
      module.scale = use_rslora_ ? alpha / std::sqrt(static_cast<double>(module.rank)) : alpha / static_cast<double>(module.rank);
      const std::string name = base_module + ".weight";
      tensors_.push_back({name, DType::kF32, {module.rows, module.columns}});
      modules_.emplace(name, module);
    }
    if (tensors_.empty()) throw InputError(adapter_->path() + ": holds no LoRA factors");
  }

  // A and B of a module in fp32; the last module's are kept, since a job reads a tensor's chunks
  // one after another.
  const std::pair<std::vector<float>, std::vector<float>>& factors(const Module& module) const {
    if (cached_ != module.a_name) {
      cache_ = {adapter_->read_f32(module.a_name), adapter_->read_f32(module.b_name)};
      cached_ = module.a_name;
    }
    return cache_;
  }

  std::string directory_, config_path_;
  std::unique_ptr<TensorReader> adapter_;
  double lora_alpha_ = 0.0;
  bool use_rslora_ = false, fan_in_fan_out_ = false;
  std::vector<std::pair<std::shared_ptr<RE2>, double>> alpha_patterns_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, Module> modules_;
  Metadata metadata_;
  mutable std::string cached_;
  mutable std::pair<std::vector<float>, std::vector<float>> cache_;
};

}  // namespace

bool is_lora_adapter(const std::string& path) { return is_directory(path) && has_model_file(path, "adapter_config.json"); }

std::unique_ptr<TensorReader> open_lora_reader(const std::string& directory) { return std::make_unique<LoraReader>(directory); }

}  // namespace gradfix
