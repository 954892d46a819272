#include "gradfix/cli/mergekit.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
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
    throw InputError(where + ": gradfix takes one number here (per-layer lists and filters apply to weight, density, gamma, epsilon, t and lambda)");
  throw InputError(where + " is " + value.dump() + ", not a number");
}

// A parameter's value as mergekit allows it (ParameterSetting): a number, a list of numbers
// interpolated over the layers, or conditions [{filter: TEXT, value: ...}, ..., {value: ...}].
ParameterSetting setting(const Json& value, const std::string& where) {
  ParameterSetting out;
  if (value.is_number()) {
    out.number = value.get<double>();
    return out;
  }
  const std::string forms = ": a parameter is a number, a list of numbers (interpolated over the layers) or a list of {filter, value}";
  if (!value.is_array() || value.empty()) throw InputError(where + " is " + value.dump() + forms);
  bool numbers = true, conditions = true;
  for (const auto& item : value) {
    numbers = numbers && item.is_number();
    conditions = conditions && item.is_object();
  }
  if (numbers) {
    out.kind = ParameterSetting::Kind::kGradient;
    for (const auto& item : value) out.gradient.push_back(item.get<double>());
    return out;
  }
  if (!conditions) throw InputError(where + " is " + value.dump() + forms);
  out.kind = ParameterSetting::Kind::kConditions;
  for (std::size_t i = 0; i < value.size(); ++i) {
    const Json& item = value[i];
    const std::string at = where + "[" + std::to_string(i) + "]";
    refuse_unknown(item, {"filter", "value"}, at);
    if (!item.contains("value")) throw InputError(at + " needs a value");
    ParameterSetting::Condition condition;
    if (item.contains("filter") && !item["filter"].is_null()) {
      if (!item["filter"].is_string()) throw InputError(at + ".filter is " + item["filter"].dump() + ", not text");
      condition.filter = item["filter"].get<std::string>();
    }
    condition.value = std::make_shared<ParameterSetting>(setting(item["value"], at + ".value"));
    out.conditions.push_back(std::move(condition));
  }
  return out;
}

bool is_number(const ParameterSetting& value) { return value.kind == ParameterSetting::Kind::kNumber; }

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

namespace {

// Reads a mergekit configuration section by section into a ModelMergeJob. Every key is read or
// refused by name; a parameter of another method is refused too (it would do nothing).
class MergeConfigReader {
 public:
  MergeConfigReader(Json config, std::string path) : config_(std::move(config)), path_(std::move(path)) {}

  ModelMergeJob read() {
    if (!config_.is_object()) throw InputError(path_ + ": a merge configuration is a mapping of keys");
    refuse_unknown(config_, {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
                             "chat_template", "gradfix"},
                   path_);
    job_.config_json = config_.dump();
    read_method();
    if (config_.contains("base_model")) job_.base = model_path(config_["base_model"], path_ + ": base_model");
    read_parameters();
    if (config_.contains("slices")) read_slices();
    else read_models();
    read_dtypes();
    read_tokenizer();
    read_gradfix_section();
    assign_signs();
    if (job_.models.empty()) throw InputError(path_ + ": no model to merge besides the base");
    if (is(ModelMergeMethod::kPassthrough)) {
      // mergekit merges the base as one more source, and passthrough takes exactly one.
      if (job_.models.size() != 1 || (!job_.base.empty() && job_.base != job_.models.front()))
        throw InputError(path_ + ": passthrough copies exactly one model (mergekit: \"Passthrough merge expects exactly one tensor\"); got " +
                         std::to_string(job_.models.size() + (!job_.base.empty() && job_.base != job_.models.front() ? 1 : 0)) +
                         " with the base_model");
      job_.base.clear();
    }
    if (is(ModelMergeMethod::kSlerp) && !has_t())
      throw InputError(path_ + ": slerp needs parameters.t (0: the base, 1: the other model), as mergekit requires it");
    if (is(ModelMergeMethod::kNearswap) && !has_t())
      throw InputError(path_ + ": nearswap needs parameters.t (the difference below which an entry takes the model's value), as "
                       "mergekit requires it");
    return job_;
  }

 private:
  bool is(ModelMergeMethod method) const { return job_.method == method; }
  const ModelMergeTraits& traits() const { return model_merge_traits(job_.method); }
  // Only the sums of deltas (linear, task arithmetic, TIES, DARE, Breadcrumbs) take weights,
  // densities, normalize, lambda and rescale.
  bool sums_deltas() const { return traits().combination == ModelMergeTraits::Combination::kDeltas; }
  bool weightless() const {
    return is(ModelMergeMethod::kSlerp) || is(ModelMergeMethod::kNearswap) || is(ModelMergeMethod::kModelStock) || is(ModelMergeMethod::kSce) ||
           is(ModelMergeMethod::kKarcher) || ram() || is(ModelMergeMethod::kArceeFusion);
  }
  bool breadcrumbs() const { return traits().sparsification == ModelMergeTraits::Sparsification::kOutliers; }
  bool della() const { return traits().sparsification == ModelMergeTraits::Sparsification::kRankedRandom; }
  bool ram() const { return is(ModelMergeMethod::kRam) || is(ModelMergeMethod::kRamplusTl); }
  bool sparsifies() const { return traits().sparsification != ModelMergeTraits::Sparsification::kNone; }

  // merge_method, and mergekit's defaults of normalize and rescale that follow from it
  // (model_merge_methods: linear and ties normalise, DARE rescales).
  void read_method() {
    if (!config_.contains("merge_method")) throw InputError(path_ + ": merge_method is missing");
    method_ = text(config_["merge_method"], path_ + ": merge_method");
    std::string names;
    bool found = false;
    for (const auto& traits : model_merge_methods()) {
      names += std::string(names.empty() ? "" : ", ") + traits.name;
      if (method_ == traits.name) {
        job_.method = traits.method;
        found = true;
      }
    }
    if (!found) throw InputError(path_ + ": merge_method '" + escaped_name(method_) + "' is not one gradfix has (" + names + ")");
    job_.normalize = traits().default_normalize;
    job_.rescale = traits().default_rescale;
  }

  // Top-level parameters: the merge's own, and defaults of the per-model ones (weight, density,
  // gamma) for every model that does not set them, as mergekit resolves them.
  void read_parameters() {
    if (!config_.contains("parameters")) return;
    const Json& parameters = config_["parameters"];
    const std::string where = path_ + ": parameters";
    if (!parameters.is_object()) throw InputError(where + " must be a mapping");
    refuse_unknown(parameters,
                   {"normalize", "lambda", "int8_mask", "rescale", "weight", "density", "gamma", "epsilon", "t", "nuslerp_flatten", "nuslerp_row_wise",
                    "filter_wise", "normalize_weights", "eps", "select_topk", "max_iter", "tol", "r", "alpha"},
                   where);
    if (is(ModelMergeMethod::kPassthrough)) {
      refuse_unknown(parameters, {"scale"}, where);
      if (parameters.contains("scale")) defaults_["scale"] = setting(parameters["scale"], where + ".scale");
      return;
    }
    auto only_for = [&](const char* key, bool applies, const char* methods) {
      if (parameters.contains(key) && !applies) throw InputError(where + "." + key + " is a parameter of " + methods + ", not of " + method_);
    };
    only_for("t", is(ModelMergeMethod::kSlerp) || is(ModelMergeMethod::kNearswap), "slerp and nearswap");
    only_for("filter_wise", is(ModelMergeMethod::kModelStock), "model_stock");
    for (const char* key : {"normalize_weights", "eps"}) only_for(key, is(ModelMergeMethod::kMultislerp), "multislerp");
    only_for("select_topk", is(ModelMergeMethod::kSce), "sce");
    for (const char* key : {"max_iter", "tol"}) only_for(key, is(ModelMergeMethod::kKarcher), "karcher");
    if (parameters.contains("tol")) job_.tol = number(parameters["tol"], where + ".tol");
    if (parameters.contains("max_iter")) {
      const double iterations = number(parameters["max_iter"], where + ".max_iter");
      if (iterations != std::floor(iterations) || iterations < 0 || iterations > 1e6)
        throw InputError(where + ".max_iter is " + parameters["max_iter"].dump() + ", not a whole number from 0 to 1000000");
      job_.max_iter = static_cast<int>(iterations);
    }
    if (parameters.contains("select_topk")) job_.select_topk = number(parameters["select_topk"], where + ".select_topk");
    if (parameters.contains("normalize_weights")) job_.normalize = boolean(parameters["normalize_weights"], where + ".normalize_weights");
    if (parameters.contains("eps")) job_.eps = number(parameters["eps"], where + ".eps");
    if (parameters.contains("filter_wise") && boolean(parameters["filter_wise"], where + ".filter_wise")) job_.vectors = MergeVectors::kRows;
    only_for("gamma", breadcrumbs(), "breadcrumbs and breadcrumbs_ties");
    only_for("epsilon", della() || ram(), "della, della_linear, ram and ramplus_tl");
    for (const char* key : {"r", "alpha"}) only_for(key, is(ModelMergeMethod::kRamplusTl), "ramplus_tl");
    if (ram()) {
      // RAM's own parameters: the merge's, one number each.
      if (parameters.contains("epsilon")) job_.ram_epsilon = number(parameters["epsilon"], where + ".epsilon");
      if (parameters.contains("r")) job_.ram_r = number(parameters["r"], where + ".r");
      if (parameters.contains("alpha")) job_.ram_alpha = number(parameters["alpha"], where + ".alpha");
    }
    for (const char* key : {"nuslerp_flatten", "nuslerp_row_wise"}) only_for(key, is(ModelMergeMethod::kNuslerp), "nuslerp");
    for (const char* key : {"normalize", "lambda", "rescale", "density"})
      only_for(key, sums_deltas(), "linear, task_arithmetic, ties, dare_*, breadcrumbs*, della*");
    only_for("int8_mask", sums_deltas() || is(ModelMergeMethod::kSce), "linear, task_arithmetic, ties, dare_*, breadcrumbs*, della*, sce");
    if (parameters.contains("weight") && weightless()) ignore_weight(where + ".weight");
    if (parameters.contains("t")) read_merge_setting(parameters["t"], "t", where, job_.t, std::nullopt);
    // mergekit's nuslerp: flatten (the default) takes each tensor as one vector whatever row_wise
    // says; otherwise row_wise picks the vectors along the first dimension, else the last.
    const bool flatten = !parameters.contains("nuslerp_flatten") || boolean(parameters["nuslerp_flatten"], where + ".nuslerp_flatten");
    const bool row_wise = parameters.contains("nuslerp_row_wise") && boolean(parameters["nuslerp_row_wise"], where + ".nuslerp_row_wise");
    if (!flatten) job_.vectors = row_wise ? MergeVectors::kColumns : MergeVectors::kRows;
    if (parameters.contains("normalize")) job_.normalize = boolean(parameters["normalize"], where + ".normalize");
    if (parameters.contains("lambda")) read_merge_setting(parameters["lambda"], "lambda", where, job_.lambda, 1.0);
    if (parameters.contains("int8_mask")) (void)boolean(parameters["int8_mask"], where + ".int8_mask");
    if (parameters.contains("rescale")) job_.rescale = boolean(parameters["rescale"], where + ".rescale");
    for (const char* key : {"weight", "density", "gamma", "epsilon"})
      if (parameters.contains(key) && !(ram() && std::string(key) == "epsilon")) defaults_[key] = setting(parameters[key], where + "." + key);
  }

  // One of the merge's own parameters that may vary by tensor (t, lambda): a number goes into
  // `scalar`, another form into the job's varying parameters, with `fallback` where none matches.
  void read_merge_setting(const Json& value, const std::string& key, const std::string& where, double& scalar, std::optional<double> fallback) {
    ParameterSetting parsed = setting(value, where + "." + key);
    if (is_number(parsed)) {
      scalar = parsed.number;
      return;
    }
    job_.varying.push_back({key, -1, {std::move(parsed)}, fallback});
  }

  // A model's weight, density or gamma: its own setting, then the top-level one (mergekit's order;
  // a setting that gives no value for a tensor falls through to the next), then `fallback`.
  // Numbers only: the value, the same for every tensor. Otherwise a varying parameter; nullopt
  // returned. Neither given: the fallback.
  std::optional<double> model_parameter(const Json& own, const std::string& key, const std::string& where, std::optional<double> fallback) {
    std::vector<ParameterSetting> chain;
    if (own.contains(key)) chain.push_back(setting(own[key], where + "." + key));
    if (defaults_.count(key)) chain.push_back(defaults_.at(key));
    if (slice_defaults_.count(key)) chain.insert(chain.begin() + (own.contains(key) ? 1 : 0), slice_defaults_.at(key));
    if (chain.empty()) return fallback;
    if (is_number(chain.front())) return chain.front().number;
    job_.varying.push_back({key, static_cast<int>(job_.models.size()), std::move(chain), fallback});
    return std::nullopt;
  }

  void read_models() {
    if (!config_.contains("models") || !config_["models"].is_array() || config_["models"].empty())
      throw InputError(path_ + ": models must be a non-empty list (or slices)");
    bool base_listed = false;
    for (std::size_t i = 0; i < config_["models"].size(); ++i) {
      const Json& entry = config_["models"][i];
      const std::string where = path_ + ": models[" + std::to_string(i) + "]";
      if (entry.is_object()) refuse_unknown(entry, {"model", "parameters", "gradfix"}, where);
      base_listed = read_model(entry, where) || base_listed;
    }
    // A linear merge takes the base as one more model: mergekit then needs its weight, and
    // refuses a base that is not listed among the models.
    if (is(ModelMergeMethod::kLinear) && !job_.base.empty() && !base_listed)
      throw InputError(path_ + ": base_model " + escaped_name(job_.base) +
                       " is not among the models of this linear merge; mergekit merges the base too and refuses it without a weight: "
                       "list it under models with a weight, or leave base_model out");
  }

  // tokenizer_source (base, union or a model) or the tokenizer: section (its source, default
  // union, the tokens' embedding sources, pad_to_multiple_of), and chat_template.
  void read_tokenizer() {
    auto source_of = [&](const Json& value, const std::string& where) {
      const std::string source = text(value, where);
      return source == "base" || source == "union" ? source : model_path(value, where);
    };
    const bool flat = config_.contains("tokenizer_source") && !config_["tokenizer_source"].is_null();
    const bool section = config_.contains("tokenizer") && !config_["tokenizer"].is_null();
    if (flat && section) throw InputError(path_ + ": tokenizer_source and tokenizer are both given; mergekit takes one of them");
    if (flat) job_.vocabulary.source = source_of(config_["tokenizer_source"], path_ + ": tokenizer_source");
    if (section) {
      const Json& tokenizer = config_["tokenizer"];
      const std::string where = path_ + ": tokenizer";
      if (!tokenizer.is_object()) throw InputError(where + " must be a mapping");
      refuse_unknown(tokenizer, {"source", "tokens", "pad_to_multiple_of"}, where);
      job_.vocabulary.source = tokenizer.contains("source") ? source_of(tokenizer["source"], where + ".source") : "union";
      if (tokenizer.contains("pad_to_multiple_of") && !tokenizer["pad_to_multiple_of"].is_null()) {
        const double multiple = number(tokenizer["pad_to_multiple_of"], where + ".pad_to_multiple_of");
        if (multiple != std::floor(multiple) || multiple < 1 || multiple > (1 << 20))
          throw InputError(where + ".pad_to_multiple_of is " + tokenizer["pad_to_multiple_of"].dump() + ", not a whole number from 1 to 2^20");
        job_.vocabulary.pad_to_multiple_of = static_cast<long long>(multiple);
      }
      if (tokenizer.contains("tokens") && !tokenizer["tokens"].is_null()) {
        if (!tokenizer["tokens"].is_object()) throw InputError(where + ".tokens must be a mapping of tokens");
        for (const auto& [token, entry] : tokenizer["tokens"].items()) job_.vocabulary.tokens.push_back(read_token(token, entry, where + ".tokens." + token));
      }
    }
    if (config_.contains("chat_template") && !config_["chat_template"].is_null()) {
      const std::string chat = text(config_["chat_template"], path_ + ": chat_template");
      // mergekit's rule: a name it knows, auto, or a template (20 characters or more, with '{').
      if (chat != "auto" && !chat_template_text(chat) && (chat.size() < 20 || chat.find('{') == std::string::npos))
        throw InputError(path_ + ": chat_template '" + escaped_name(chat) + "' is neither a template nor a name gradfix knows (" +
                         chat_template_names() + ", auto)");
      job_.chat_template = chat;
    }
  }

  // One token of the tokenizer section: {source: MODEL | {kind: model_token, model, token_id |
  // token} | {kind: zero}, force}.
  TokenSetting read_token(const std::string& token, const Json& entry, const std::string& where) {
    if (!entry.is_object() || !entry.contains("source")) throw InputError(where + " needs a source (a model, or {kind: model_token, ...} or {kind: zero})");
    refuse_unknown(entry, {"source", "force"}, where);
    TokenSetting out;
    out.token = token;
    if (entry.contains("force")) out.force = boolean(entry["force"], where + ".force");
    const Json& source = entry["source"];
    if (source.is_string()) {
      out.source.model = model_path(source, where + ".source");
      return out;
    }
    if (!source.is_object() || !source.contains("kind")) throw InputError(where + ".source is neither a model nor a mapping with a kind");
    const std::string kind = text(source["kind"], where + ".source.kind");
    if (kind == "zero") {
      refuse_unknown(source, {"kind"}, where + ".source");
      out.source.kind = TokenEmbeddingSource::Kind::kZero;
      return out;
    }
    if (kind != "model_token") throw InputError(where + ".source.kind '" + escaped_name(kind) + "': valid: model_token, zero");
    refuse_unknown(source, {"kind", "model", "token_id", "token"}, where + ".source");
    if (!source.contains("model")) throw InputError(where + ".source needs a model");
    out.source.kind = TokenEmbeddingSource::Kind::kModelToken;
    out.source.model = model_path(source["model"], where + ".source.model");
    if (source.contains("token_id") == source.contains("token"))
      throw InputError(where + ".source needs one of token_id and token (mergekit: \"token_id or token must be specified\", \"only one\")");
    if (source.contains("token_id")) {
      const double id = number(source["token_id"], where + ".source.token_id");
      if (id != std::floor(id) || id < 0 || id > (1 << 24)) throw InputError(where + ".source.token_id is " + source["token_id"].dump() + ", not a token id");
      out.source.token_id = static_cast<long long>(id);
    } else {
      out.source.token = text(source["token"], where + ".source.token");
    }
    return out;
  }

  // Whether t is given for every tensor: at the top level, or in every slice.
  bool has_t() const {
    if (config_.contains("parameters") && config_["parameters"].is_object() && config_["parameters"].contains("t")) return true;
    if (!config_.contains("slices")) return false;
    for (const auto& slice : config_["slices"])
      if (!(slice.contains("parameters") && slice["parameters"].is_object() && slice["parameters"].contains("t"))) return false;
    return true;
  }

  // slices: each slice's sources read as the models of a merge of their own (the same rules, with
  // the slice's parameters between a source's and the top-level ones), in the job's model order;
  // the job's own models and parameters are the first slice's.
  void read_slices() {
    const Json& slices = config_["slices"];
    if (config_.contains("models")) throw InputError(path_ + ": models and slices are both given; mergekit takes exactly one of them");
    if (!slices.is_array() || slices.empty()) throw InputError(path_ + ": slices must be a non-empty list");
    const ModelMergeJob outside = job_;
    std::vector<MergeSlice> read;
    std::vector<std::string> notes = outside.notes;  // every slice's, in order
    ModelMergeJob first;
    for (std::size_t s = 0; s < slices.size(); ++s) {
      const Json& slice = slices[s];
      const std::string where = path_ + ": slices[" + std::to_string(s) + "]";
      if (!slice.is_object() || !slice.contains("sources") || !slice["sources"].is_array() || slice["sources"].empty())
        throw InputError(where + " needs 'sources', a non-empty list");
      refuse_unknown(slice, {"sources", "parameters", "base_model"}, where);
      if (slice.contains("base_model") && model_path(slice["base_model"], where + ".base_model") != job_.base)
        throw InputError(where + ".base_model differs from the top-level base_model; gradfix takes one base for every slice");
      job_ = outside;
      slice_defaults_.clear();
      std::vector<VaryingParameter> own;  // the slice's t and lambda
      if (slice.contains("parameters")) {
        const Json& parameters = slice["parameters"];
        const std::string at = where + ".parameters";
        if (!parameters.is_object()) throw InputError(at + " must be a mapping");
        refuse_unknown(parameters, {"weight", "density", "gamma", "epsilon", "scale", "t", "lambda"}, at);
        for (const char* key : {"weight", "density", "gamma", "epsilon", "scale"})
          if (parameters.contains(key)) slice_defaults_[key] = setting(parameters[key], at + "." + key);
        if (parameters.contains("weight") && weightless()) ignore_weight(at + ".weight");
        if (parameters.contains("gamma") && !breadcrumbs()) throw InputError(at + ".gamma is a parameter of breadcrumbs and breadcrumbs_ties, not of " + method_);
        if (parameters.contains("epsilon") && !della()) throw InputError(at + ".epsilon is a parameter of della and della_linear, not of " + method_);
        if (parameters.contains("scale") && !is(ModelMergeMethod::kPassthrough)) throw InputError(at + ".scale is a parameter of passthrough, not of " + method_);
        if (parameters.contains("t") && !(is(ModelMergeMethod::kSlerp) || is(ModelMergeMethod::kNearswap)))
          throw InputError(at + ".t is a parameter of slerp and nearswap, not of " + method_);
        if (parameters.contains("lambda") && !sums_deltas())
          throw InputError(at + ".lambda is a parameter of linear, task_arithmetic, ties, dare_*, breadcrumbs*, della*, not of " + method_);
        // The slice's own t or lambda first, then the top-level one.
        for (const char* key : {"t", "lambda"}) {
          if (!parameters.contains(key)) continue;
          std::vector<ParameterSetting> chain = {setting(parameters[key], at + "." + key)};
          if (config_.contains("parameters") && config_["parameters"].contains(key))
            chain.push_back(setting(config_["parameters"][key], path_ + ": parameters." + key));
          own.push_back({key, -1, std::move(chain), std::string(key) == "lambda" ? std::optional<double>(1.0) : std::nullopt});
        }
      }
      MergeSlice out;
      bool base_listed = false;
      for (std::size_t i = 0; i < slice["sources"].size(); ++i) {
        const Json& entry = slice["sources"][i];
        const std::string at = where + ".sources[" + std::to_string(i) + "]";
        if (entry.is_object()) refuse_unknown(entry, {"model", "layer_range", "parameters"}, at);
        const std::size_t models_before = job_.models.size();
        const bool base = read_model(entry, at);
        base_listed = base_listed || base;
        if (!entry.contains("layer_range") || !entry["layer_range"].is_array() || entry["layer_range"].size() != 2)
          throw InputError(at + " needs a layer_range [begin, end]");
        MergeSliceSource source{model_path(entry["model"], at + ".model"), 0, 0};
        for (std::size_t end = 0; end < 2; ++end) {
          const double value = number(entry["layer_range"][end], at + ".layer_range");
          if (value != std::floor(value) || value < 0 || value > 1e6)
            throw InputError(at + ".layer_range holds " + entry["layer_range"][end].dump() + ", not a layer number");
          (end == 0 ? source.begin : source.end) = static_cast<long long>(value);
        }
        if (job_.models.size() > models_before) out.models.push_back(source);
        else out.base = source;
      }
      if (!base_listed && !job_.base.empty() && !is(ModelMergeMethod::kPassthrough))
        throw InputError(where + " has no source from the base_model " + escaped_name(job_.base) +
                         " (mergekit merges only a slice's sources: list the base's layers among them)");
      out.defaults = {job_.weights, job_.densities, job_.gammas, job_.epsilons, job_.t, job_.lambda};
      out.varying = job_.varying;
      out.varying.insert(out.varying.end(), own.begin(), own.end());
      read.push_back(std::move(out));
      notes.insert(notes.end(), job_.notes.begin() + static_cast<std::ptrdiff_t>(outside.notes.size()), job_.notes.end());
      if (s == 0) first = job_;
    }
    slice_defaults_.clear();
    job_ = first;
    job_.slices = std::move(read);
    job_.notes = std::move(notes);
    // A linear merge takes the base as one of its models (above): no separate base part.
    if (is(ModelMergeMethod::kLinear)) job_.base.clear();
  }

  // A weight given to a method that takes none: mergekit ignores it (its own tests give every
  // model a weight, whatever the method), and so does gradfix, saying so in the job's notes.
  void ignore_weight(const std::string& where) {
    job_.notes.push_back(where + " is ignored: " + method_ + " takes no weights" +
                         (is(ModelMergeMethod::kModelStock)    ? std::string(" (the deltas' angle sets the interpolation)")
                          : is(ModelMergeMethod::kSce)         ? std::string(" (each delta's mean square sets its weight)")
                          : is(ModelMergeMethod::kKarcher)     ? std::string(" (the models weigh 1 / k each)")
                          : ram()                              ? std::string(" (each entry's deltas are kept or averaged)")
                          : is(ModelMergeMethod::kArceeFusion) ? std::string(" (the importance of each entry decides)")
                                                               : std::string(" (t sets the interpolation)")) +
                         ", as mergekit ignores it");
  }

  // One model of `models` (or a source of a slice); returns whether it is the base.
  bool read_model(const Json& entry, const std::string& where) {
    if (!entry.is_object() || !entry.contains("model")) throw InputError(where + " needs a 'model'");
    const std::string model = model_path(entry["model"], where + ".model");
    Json parameters = entry.contains("parameters") ? entry["parameters"] : Json::object();
    if (!parameters.is_object()) throw InputError(where + ".parameters must be a mapping");
    refuse_unknown(parameters, {"weight", "density", "gamma", "epsilon", "scale"}, where + ".parameters");
    if (parameters.contains("scale") && !is(ModelMergeMethod::kPassthrough))
      throw InputError(where + ".parameters.scale is a parameter of passthrough, not of " + method_);
    if (parameters.contains("gamma") && !breadcrumbs())
      throw InputError(where + ".parameters.gamma is a parameter of breadcrumbs and breadcrumbs_ties, not of " + method_);
    if (parameters.contains("epsilon") && !della())
      throw InputError(where + ".parameters.epsilon is a parameter of della and della_linear, not of " + method_);
    // The base may be listed among the models (mergekit allows it): it adds nothing to a
    // task-arithmetic merge and is skipped there, as mergekit skips it.
    const bool base = model == job_.base;
    if (base && !is(ModelMergeMethod::kLinear) && !is(ModelMergeMethod::kPassthrough)) return true;
    if (weightless() && parameters.contains("weight")) ignore_weight(where + ".parameters.weight");
    const std::string at = where + ".parameters";
    const std::size_t varying_before = job_.varying.size();
    if (is(ModelMergeMethod::kPassthrough)) {
      // Its one tensor times `scale` (default 1), as a weight that is never normalised.
      refuse_unknown(parameters, {"scale"}, at);
      const std::optional<double> scale = model_parameter(parameters, "scale", at, 1.0);
      if (job_.varying.size() > varying_before) job_.varying.back().name = "weight";
      job_.models.push_back(model);
      job_.weights.push_back(scale.value_or(1.0));
      job_.densities.push_back(1.0);
      return base;
    }
    const std::optional<double> weight = weightless() ? 1.0 : model_parameter(parameters, "weight", at, std::nullopt);
    if (!weight && job_.varying.size() == varying_before)
      throw InputError(at + ".weight is missing (mergekit requires it, here or in the top-level parameters)");
    const std::optional<double> density = model_parameter(parameters, "density", at, 1.0);
    const std::optional<double> gamma = breadcrumbs() ? model_parameter(parameters, "gamma", at, 0.01) : std::optional<double>(0.01);
    // mergekit's default epsilon for DELLA.
    const std::optional<double> epsilon = della() ? model_parameter(parameters, "epsilon", at, 0.15) : std::optional<double>(0.15);
    job_.models.push_back(model);
    // A parameter that varies by tensor keeps its fallback here (the job's parameters_for gives
    // each tensor its value); the metadata records the configuration itself.
    job_.weights.push_back(weight.value_or(0.0));
    job_.densities.push_back(density.value_or(1.0));
    if (breadcrumbs()) job_.gammas.push_back(gamma.value_or(0.01));
    if (della()) job_.epsilons.push_back(epsilon.value_or(0.15));
    const bool density_varies =
        std::any_of(job_.varying.begin() + static_cast<long>(varying_before), job_.varying.end(), [](const VaryingParameter& p) { return p.name == "density"; });
    if (!sparsifies() && (job_.densities.back() != 1.0 || density_varies))
      throw InputError(at + ".density: " + method_ + " does not sparsify (density is a ties parameter)");
    // gradfix's per-model addition: the model's sign statistics on the base (gradfix signs).
    if (entry.contains("gradfix")) {
      const Json& extra = entry["gradfix"];
      if (!extra.is_object()) throw InputError(where + ".gradfix must be a mapping");
      refuse_unknown(extra, {"signs"}, where + ".gradfix");
      if (extra.contains("signs")) signs_by_model_.emplace_back(job_.models.size() - 1, text(extra["signs"], where + ".gradfix.signs"));
    }
    return base;
  }

  // mergekit computes in `dtype` and writes out_dtype, else dtype; gradfix rounds each operation
  // of a 16-bit delta merge to `dtype` as well, computes the rest in fp32 (fp64 for F64), and
  // writes the same dtype mergekit would.
  void read_dtypes() {
    for (const char* key : {"dtype", "out_dtype"}) {
      if (!config_.contains(key) || config_[key].is_null()) continue;
      const std::string name = text(config_[key], path_ + ": " + key);
      const auto dtype = parse_float_dtype(name);
      if (!dtype) throw InputError(path_ + ": " + key + " '" + escaped_name(name) + "' is not a float dtype gradfix knows");
      if (std::string(key) == "out_dtype" || !job_.output.out_dtype) job_.output.out_dtype = *dtype;
      if (std::string(key) == "dtype") job_.input_dtype = *dtype;
    }
  }

  // What mergekit lacks: the seed of DARE's draws (mergekit takes torch's global generator) and
  // gradient-sign masks, as gradfix merge's options name them.
  void read_gradfix_section() {
    if (!config_.contains("gradfix")) return;
    const Json& extra = config_["gradfix"];
    const std::string where = path_ + ": gradfix";
    if (!extra.is_object()) throw InputError(where + " must be a mapping");
    refuse_unknown(extra, {"seed", "order", "mask_mode", "beta", "gamma", "soft_c", "soft_input", "inputs", "arithmetic"}, where);
    if (extra.contains("arithmetic")) {
      const std::string arithmetic = text(extra["arithmetic"], where + ".arithmetic");
      if (arithmetic != "dtype" && arithmetic != "double")
        throw InputError(where + ".arithmetic '" + escaped_name(arithmetic) + "': valid: dtype (each operation rounded to `dtype`, as mergekit "
                         "computes), double (computed in double, rounded once)");
      job_.arithmetic_in_dtype = arithmetic == "dtype";
    }
    if (extra.contains("inputs")) {
      const std::string inputs = text(extra["inputs"], where + ".inputs");
      if (inputs != "dtype" && inputs != "stored") throw InputError(where + ".inputs '" + escaped_name(inputs) + "': valid: dtype, stored");
      job_.stored_inputs = inputs == "stored";
    }
    if (extra.contains("seed")) {
      const double seed = number(extra["seed"], where + ".seed");
      if (!(seed >= 0 && seed <= 9007199254740992.0) || seed != std::floor(seed)) throw InputError(where + ".seed must be a non-negative integer");
      job_.seed = static_cast<std::uint64_t>(seed);
      job_.mask.seed = job_.seed;
    }
    auto prefixed = [&](const std::string& key, auto parse) {
      try {
        return parse(text(extra[key], where + "." + key));
      } catch (const InputError& error) {
        throw InputError(where + "." + key + ": " + escaped_name(error.what()));
      }
    };
    if (extra.contains("order")) job_.order = prefixed("order", parse_merge_order);
    if (extra.contains("mask_mode")) job_.mode = prefixed("mask_mode", parse_mask_mode);
    for (const char* key : {"beta", "gamma", "soft_c"}) {
      if (!extra.contains(key)) continue;
      const double value = number(extra[key], where + "." + key);
      if (!std::isfinite(value)) throw InputError(where + "." + key + " must be finite");
      (std::string(key) == "beta" ? job_.mask.beta : std::string(key) == "gamma" ? job_.mask.gamma : job_.mask.c) = value;
    }
    if (!(job_.mask.c > 0.0)) throw InputError(where + ".soft_c must be positive");
    if (extra.contains("soft_input")) {
      const std::string input = text(extra["soft_input"], where + ".soft_input");
      if (input != "sign" && input != "raw") throw InputError(where + ".soft_input '" + escaped_name(input) + "': valid: sign, raw");
      job_.mask.raw_soft_input = input == "raw";
    }
  }

  // Every model's statistics when an order is set, none otherwise.
  void assign_signs() {
    job_.validate_slices();  // masks with slices refused here, before the missing statistics are named
    if (job_.order == MergeOrder::kNone) {
      if (!signs_by_model_.empty())
        throw InputError(path_ + ": models name gradfix.signs but gradfix.order is not set (mask-then-merge or merge-then-mask)");
      return;
    }
    job_.signs.assign(job_.models.size(), "");
    for (const auto& [model, file] : signs_by_model_) job_.signs[model] = file;
    for (std::size_t m = 0; m < job_.models.size(); ++m)
      if (job_.signs[m].empty())
        throw InputError(path_ + ": gradfix.order " + merge_order_name(job_.order) + " needs sign statistics for every model: " +
                         escaped_name(job_.models[m]) + " has no gradfix: {signs: FILE}");
  }

  Json config_;
  std::string path_;
  std::string method_;
  ModelMergeJob job_;
  std::map<std::string, ParameterSetting> defaults_;  // top-level weight, density, gamma
  std::map<std::string, ParameterSetting> slice_defaults_;  // the same of the slice being read
  std::vector<std::pair<std::size_t, std::string>> signs_by_model_;
};

}  // namespace

ModelMergeJob mergekit_job(const std::string& path) {
  return MergeConfigReader(parse_yaml(read_option_file(path, "merge configuration"), path), path).read();
}

}  // namespace gradfix
