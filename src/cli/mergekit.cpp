#include "gradfix/cli/mergekit.hpp"

#include <cmath>
#include <set>

#include "gradfix/cli/cli.hpp"
#include "gradfix/cli/yaml.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/model_files.hpp"

namespace gradfix {
namespace {

using Json = nlohmann::json;

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Keys of `object` outside `known` are refused, all named at once.
void refuse_unknown(const Json& object, const std::set<std::string>& known, const std::string& where) {
  std::vector<std::string> unknown;
  for (const auto& [key, value] : object.items())
    if (!known.count(key)) unknown.push_back(key);
  if (unknown.empty()) return;
  std::string valid;
  for (const auto& key : known) valid += (valid.empty() ? "" : ", ") + key;
  throw InputError(where + ": gradfix does not read " + format_name_list(unknown) + " (it reads " + valid + ")");
}

// A parameter that must be one number: mergekit also allows per-layer lists ("gradients") and
// filtered values, which gradfix does not apply.
double number(const Json& value, const std::string& where) {
  if (value.is_number()) return value.get<double>();
  if (value.is_array() || value.is_object())
    throw InputError(where + ": per-layer values (lists or filters) are not supported; give one number");
  throw InputError(where + " is " + value.dump() + ", not a number");
}

bool boolean(const Json& value, const std::string& where) {
  if (!value.is_boolean()) throw InputError(where + " is " + value.dump() + ", not true or false");
  return value.get<bool>();
}

std::string text(const Json& value, const std::string& where) {
  if (!value.is_string()) throw InputError(where + " is " + value.dump() + ", not text");
  return value.get<std::string>();
}

std::string model_path(const Json& value, const std::string& where) {
  const std::string path = text(value, where);
  if (path.find('+') != std::string::npos)
    throw InputError(where + " '" + escaped_name(path) + "': mergekit's MODEL+LORA form is not read; apply the adapter first "
                     "(gradfix apply --task-vector ADAPTER_DIR)");
  return resolve_model_reference(path);
}

}  // namespace

bool is_yaml_path(const std::string& path) { return ends_with(path, ".yml") || ends_with(path, ".yaml"); }

ModelMergeJob mergekit_job(const std::string& path) {
  const Json config = parse_yaml(read_option_file(path, "merge configuration"), path);
  if (!config.is_object()) throw InputError(path + ": a merge configuration is a mapping of keys");
  refuse_unknown(config, {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "gradfix"}, path);
  ModelMergeJob job;
  job.config_json = config.dump();
  std::vector<std::pair<std::size_t, std::string>> signs_by_model;
  if (!config.contains("merge_method")) throw InputError(path + ": merge_method is missing");
  const std::string method = text(config["merge_method"], path + ": merge_method");
  if (method == "linear") job.method = ModelMergeMethod::kLinear;
  else if (method == "task_arithmetic") job.method = ModelMergeMethod::kTaskArithmetic;
  else if (method == "ties") job.method = ModelMergeMethod::kTies;
  else if (method == "dare_ties") job.method = ModelMergeMethod::kDareTies;
  else if (method == "dare_linear") job.method = ModelMergeMethod::kDareLinear;
  else if (method == "slerp") job.method = ModelMergeMethod::kSlerp;
  else if (method == "nuslerp") job.method = ModelMergeMethod::kNuslerp;
  else if (method == "breadcrumbs") job.method = ModelMergeMethod::kBreadcrumbs;
  else if (method == "breadcrumbs_ties") job.method = ModelMergeMethod::kBreadcrumbsTies;
  else
    throw InputError(path + ": merge_method '" + escaped_name(method) +
                     "' is not one gradfix has (linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, slerp, nuslerp)");
  const bool spherical = job.method == ModelMergeMethod::kSlerp || job.method == ModelMergeMethod::kNuslerp;
  // mergekit's defaults: linear and ties normalise by the weights, the others do not; DARE
  // rescales what it keeps.
  job.normalize = job.method == ModelMergeMethod::kLinear || job.method == ModelMergeMethod::kTies;
  job.rescale = job.method == ModelMergeMethod::kDareLinear || job.method == ModelMergeMethod::kDareTies;
  const bool breadcrumbs = job.method == ModelMergeMethod::kBreadcrumbs || job.method == ModelMergeMethod::kBreadcrumbsTies;
  const bool sparsifies = job.method == ModelMergeMethod::kTies || job.method == ModelMergeMethod::kDareTies ||
                          job.method == ModelMergeMethod::kDareLinear || breadcrumbs;
  if (config.contains("base_model")) job.base = model_path(config["base_model"], path + ": base_model");
  // Top-level parameters: the merge's own, and defaults of the per-model ones (weight, density)
  // for every model that does not set them, as mergekit resolves them.
  Json defaults = Json::object();
  if (config.contains("parameters")) {
    const Json& parameters = config["parameters"];
    if (!parameters.is_object()) throw InputError(path + ": parameters must be a mapping");
    refuse_unknown(parameters, {"normalize", "lambda", "int8_mask", "rescale", "weight", "density", "gamma", "t", "nuslerp_flatten", "nuslerp_row_wise"},
                   path + ": parameters");
    // Each method's own parameters, and none of another's: a parameter that does nothing is refused.
    auto only_for = [&](const char* key, bool applies, const char* methods) {
      if (parameters.contains(key) && !applies)
        throw InputError(path + ": parameters." + key + " is a parameter of " + methods + ", not of " + method);
    };
    only_for("t", job.method == ModelMergeMethod::kSlerp, "slerp");
    only_for("gamma", breadcrumbs, "breadcrumbs and breadcrumbs_ties");
    for (const char* key : {"nuslerp_flatten", "nuslerp_row_wise"}) only_for(key, job.method == ModelMergeMethod::kNuslerp, "nuslerp");
    for (const char* key : {"normalize", "lambda", "rescale", "int8_mask", "density"})
      only_for(key, !spherical, "linear, task_arithmetic, ties and dare_*");
    if (parameters.contains("t")) job.t = number(parameters["t"], path + ": parameters.t");
    if (parameters.contains("nuslerp_flatten") && !boolean(parameters["nuslerp_flatten"], path + ": parameters.nuslerp_flatten"))
      throw InputError(path + ": parameters.nuslerp_flatten: false (row- or column-wise nuslerp) is not implemented; gradfix "
                       "interpolates each tensor as one vector, mergekit's default (nuslerp_flatten: true)");
    if (parameters.contains("nuslerp_row_wise")) (void)boolean(parameters["nuslerp_row_wise"], path + ": parameters.nuslerp_row_wise");
    if (parameters.contains("normalize")) job.normalize = boolean(parameters["normalize"], path + ": parameters.normalize");
    if (parameters.contains("lambda")) job.lambda = number(parameters["lambda"], path + ": parameters.lambda");
    if (parameters.contains("int8_mask")) (void)boolean(parameters["int8_mask"], path + ": parameters.int8_mask");
    if (parameters.contains("rescale")) job.rescale = boolean(parameters["rescale"], path + ": parameters.rescale");
    for (const char* key : {"weight", "density", "gamma"})
      if (parameters.contains(key)) defaults[key] = parameters[key];
  }
  bool base_listed = false;
  if (!config.contains("models") || !config["models"].is_array() || config["models"].empty())
    throw InputError(path + ": models must be a non-empty list");
  for (std::size_t i = 0; i < config["models"].size(); ++i) {
    const Json& entry = config["models"][i];
    const std::string where = path + ": models[" + std::to_string(i) + "]";
    if (!entry.is_object() || !entry.contains("model")) throw InputError(where + " needs a 'model'");
    refuse_unknown(entry, {"model", "parameters", "gradfix"}, where);
    const std::string model = model_path(entry["model"], where + ".model");
    Json parameters = entry.contains("parameters") ? entry["parameters"] : Json::object();
    if (!parameters.is_object()) throw InputError(where + ".parameters must be a mapping");
    refuse_unknown(parameters, {"weight", "density", "gamma"}, where + ".parameters");
    if (parameters.contains("gamma") && !breadcrumbs)
      throw InputError(where + ".parameters.gamma is a parameter of breadcrumbs and breadcrumbs_ties, not of " + method);
    for (const auto& [key, value] : defaults.items())
      if (!parameters.contains(key)) parameters[key] = value;
    // The base may be listed among the models (mergekit allows it): it adds nothing to a
    // task-arithmetic merge and is skipped there, as mergekit skips it.
    base_listed = base_listed || model == job.base;
    if (model == job.base && job.method != ModelMergeMethod::kLinear) continue;
    if (job.method == ModelMergeMethod::kSlerp) {
      // slerp weighs by t alone.
      if (parameters.contains("weight")) throw InputError(where + ".parameters.weight: slerp takes no weights; t (0: the base, 1: this model) is in the top-level parameters");
      parameters["weight"] = 1.0;
    }
    if (!parameters.contains("weight"))
      throw InputError(where + ".parameters.weight is missing (mergekit requires it, here or in the top-level parameters)");
    job.models.push_back(model);
    job.weights.push_back(number(parameters["weight"], where + ".parameters.weight"));
    job.densities.push_back(parameters.contains("density") ? number(parameters["density"], where + ".parameters.density") : 1.0);
    if (breadcrumbs) job.gammas.push_back(parameters.contains("gamma") ? number(parameters["gamma"], where + ".parameters.gamma") : 0.01);
    // gradfix's per-model addition: the model's sign statistics on the base (gradfix signs).
    if (entry.contains("gradfix")) {
      const Json& extra = entry["gradfix"];
      if (!extra.is_object()) throw InputError(where + ".gradfix must be a mapping");
      refuse_unknown(extra, {"signs"}, where + ".gradfix");
      if (extra.contains("signs")) signs_by_model.emplace_back(job.models.size() - 1, text(extra["signs"], where + ".gradfix.signs"));
    }
    if (!sparsifies && job.densities.back() != 1.0)
      throw InputError(where + ".parameters.density: " + method + " does not sparsify (density is a ties parameter)");
  }
  // A linear merge takes the base as one more model: mergekit then needs its weight, and refuses
  // a base that is not listed among the models.
  if (job.method == ModelMergeMethod::kLinear && !job.base.empty() && !base_listed)
    throw InputError(path + ": base_model " + escaped_name(job.base) +
                     " is not among the models of this linear merge; mergekit merges the base too and refuses it without a weight: "
                     "list it under models with a weight, or leave base_model out");
  // mergekit computes in `dtype` and writes out_dtype, else dtype; gradfix computes in fp32 (fp64
  // for F64) and writes the same dtype mergekit would.
  for (const char* key : {"dtype", "out_dtype"}) {
    if (!config.contains(key) || config[key].is_null()) continue;
    const std::string name = text(config[key], path + ": " + key);
    const auto dtype = parse_float_dtype(name);
    if (!dtype) throw InputError(path + ": " + key + " '" + escaped_name(name) + "' is not a float dtype gradfix knows");
    if (std::string(key) == "out_dtype" || !job.output.out_dtype) job.output.out_dtype = *dtype;
  }
  if (config.contains("tokenizer_source") && !config["tokenizer_source"].is_null() &&
      text(config["tokenizer_source"], path + ": tokenizer_source") != "base")
    throw InputError(path + ": tokenizer_source '" + escaped_name(config["tokenizer_source"].get<std::string>()) +
                     "': gradfix carries the base model's tokenizer only (tokenizer_source: base)");
  // What mergekit lacks: the seed of DARE's draws (mergekit takes torch's global generator) and
  // gradient-sign masks, as gradfix merge's options name them.
  if (config.contains("gradfix")) {
    const Json& extra = config["gradfix"];
    const std::string where = path + ": gradfix";
    if (!extra.is_object()) throw InputError(where + " must be a mapping");
    refuse_unknown(extra, {"seed", "order", "mask_mode", "beta", "gamma", "soft_c", "soft_input"}, where);
    if (extra.contains("seed")) {
      const double seed = number(extra["seed"], where + ".seed");
      if (!(seed >= 0 && seed <= 9007199254740992.0) || seed != std::floor(seed))
        throw InputError(where + ".seed must be a non-negative integer");
      job.seed = static_cast<std::uint64_t>(seed);
      job.mask.seed = job.seed;
    }
    auto prefixed = [&](const std::string& key, auto parse) {
      try {
        return parse(text(extra[key], where + "." + key));
      } catch (const InputError& error) {
        throw InputError(where + "." + key + ": " + escaped_name(error.what()));
      }
    };
    if (extra.contains("order")) job.order = prefixed("order", parse_merge_order);
    if (extra.contains("mask_mode")) job.mode = prefixed("mask_mode", parse_mask_mode);
    for (const char* key : {"beta", "gamma", "soft_c"}) {
      if (!extra.contains(key)) continue;
      const double value = number(extra[key], where + "." + key);
      if (!std::isfinite(value)) throw InputError(where + "." + key + " must be finite");
      (std::string(key) == "beta" ? job.mask.beta : std::string(key) == "gamma" ? job.mask.gamma : job.mask.c) = value;
    }
    if (!(job.mask.c > 0.0)) throw InputError(where + ".soft_c must be positive");
    if (extra.contains("soft_input")) {
      const std::string input = text(extra["soft_input"], where + ".soft_input");
      if (input != "sign" && input != "raw") throw InputError(where + ".soft_input '" + escaped_name(input) + "': valid: sign, raw");
      job.mask.raw_soft_input = input == "raw";
    }
  }
  if (job.order != MergeOrder::kNone) {
    job.signs.assign(job.models.size(), "");
    for (const auto& [model, file] : signs_by_model) job.signs[model] = file;
    for (std::size_t m = 0; m < job.models.size(); ++m)
      if (job.signs[m].empty())
        throw InputError(path + ": gradfix.order " + merge_order_name(job.order) + " needs sign statistics for every model: " +
                         escaped_name(job.models[m]) + " has no gradfix: {signs: FILE}");
  } else if (!signs_by_model.empty()) {
    throw InputError(path + ": models name gradfix.signs but gradfix.order is not set (mask-then-merge or merge-then-mask)");
  }
  if (job.models.empty()) throw InputError(path + ": no model to merge besides the base");
  if (job.method == ModelMergeMethod::kSlerp && !(config.contains("parameters") && config["parameters"].contains("t")))
    throw InputError(path + ": slerp needs parameters.t (0: the base, 1: the other model), as mergekit requires it");
  return job;
}

}  // namespace gradfix
