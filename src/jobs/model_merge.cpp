// gradfix merge --config: whole models merged by mergekit's rules. This file: the inputs, and the
// methods that sum (sparsified, weighted) deltas from a base (linear, task_arithmetic, ties,
// dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear), with gradient-sign masks before or after
// the merge; model_merge_vectors.cpp: those that take each tensor as one vector.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <regex>
#include <set>

#include "gradfix/io/exact_sum.hpp"
#include "model_merge_internal.hpp"

namespace gradfix {
using namespace file_jobs;

const std::vector<ModelMergeTraits>& model_merge_methods() {
  using M = ModelMergeMethod;
  using S = ModelMergeTraits::Sparsification;
  using C = ModelMergeTraits::Combination;
  static const std::vector<ModelMergeTraits> kMethods = {
      // method              name                sparsification  consensus combination    normalize rescale
      {M::kLinear,           "linear",           S::kNone,       false,    C::kDeltas,    true,     false},
      {M::kTaskArithmetic,   "task_arithmetic",  S::kNone,       false,    C::kDeltas,    false,    false},
      {M::kTies,             "ties",             S::kMagnitude,  true,     C::kDeltas,    true,     false},
      {M::kDareTies,         "dare_ties",        S::kRandom,     true,     C::kDeltas,    false,    true},
      {M::kDareLinear,       "dare_linear",      S::kRandom,     false,    C::kDeltas,    false,    true},
      {M::kBreadcrumbs,      "breadcrumbs",      S::kOutliers,   false,    C::kDeltas,    false,    false},
      {M::kBreadcrumbsTies,  "breadcrumbs_ties", S::kOutliers,   true,     C::kDeltas,    false,    false},
      {M::kDella,            "della",            S::kRankedRandom, true,   C::kDeltas,    true,     true},
      {M::kDellaLinear,      "della_linear",     S::kRankedRandom, false,  C::kDeltas,    false,    true},
      {M::kPassthrough,      "passthrough",      S::kNone,       false,    C::kDeltas,    false,    false},
      {M::kRam,              "ram",              S::kNone,       false,    C::kRam,       false,    false},
      {M::kRamplusTl,        "ramplus_tl",       S::kNone,       false,    C::kRam,       false,    false},
      {M::kArceeFusion,      "arcee_fusion",     S::kNone,       false,    C::kArceeFusion, false,  false},
      {M::kSlerp,            "slerp",            S::kNone,       false,    C::kSpherical, false,    false},
      {M::kNuslerp,          "nuslerp",          S::kNone,       false,    C::kSpherical, false,    false},
      {M::kNearswap,         "nearswap",         S::kNone,       false,    C::kNearswap,  false,    false},
      {M::kModelStock,       "model_stock",      S::kNone,       false,    C::kModelStock, false,   false},
      {M::kMultislerp,       "multislerp",       S::kNone,       false,    C::kMultislerp, true,    false},
      {M::kSce,              "sce",              S::kNone,       false,    C::kSce,       false,    false},
      {M::kKarcher,          "karcher",          S::kNone,       false,    C::kKarcher,   false,    false}};
  return kMethods;
}

const ModelMergeTraits& model_merge_traits(ModelMergeMethod method) {
  for (const auto& traits : model_merge_methods())
    if (traits.method == method) return traits;
  GRADFIX_CHECK(false, "a merge method without traits");
}

const char* model_merge_method_name(ModelMergeMethod method) { return model_merge_traits(method).name; }

namespace file_jobs {

ChunksByTensor merged_tensors_here(const ChunkedJob& chunked, const std::set<std::string>& merged) {
  ChunksByTensor tensors;
  const auto& layout = chunked.layout();
  for (const auto& chunk : chunked.chunks())
    if (merged.count(layout[chunk.tensor].name)) tensors[chunk.tensor].push_back(chunk);
  for (std::size_t t = 0; t < layout.size(); ++t)
    if (merged.count(layout[t].name) && chunked.plan().is_split(t)) tensors[t];
  return tensors;
}

std::vector<double> tensor_totals(const Ranks& ranks, const ChunkedJob& chunked, std::size_t tensor, std::vector<ExactSum>& sums) {
  if (chunked.plan().is_split(tensor)) return allreduce_exact_sums(ranks.context().stats(), sums);
  std::vector<double> totals;
  for (ExactSum& sum : sums) totals.push_back(sum.value());
  return totals;
}

double tensor_total(const Ranks& ranks, const ChunkedJob& chunked, std::size_t tensor, ExactSum& sum) {
  std::vector<ExactSum> one = {sum};
  return tensor_totals(ranks, chunked, tensor, one).front();
}


}  // namespace file_jobs

std::optional<double> ParameterSetting::at(const std::string& tensor, double fraction) const {
  switch (kind) {
    case Kind::kNumber: return number;
    case Kind::kGradient: {
      // mergekit's evaluate_setting: the point t (n - 1) of the list, between its neighbours.
      const double scaled = fraction * static_cast<double>(gradient.size() - 1);
      const auto low = static_cast<std::size_t>(scaled);
      const std::size_t high = std::min(gradient.size() - 1, low + 1);
      const double part = scaled - static_cast<double>(low);
      return (1.0 - part) * gradient[low] + part * gradient[high];
    }
    case Kind::kConditions:
      for (const auto& condition : conditions)
        if (condition.filter.empty() || condition.filter == "*" || tensor.find(condition.filter) != std::string::npos)
          return condition.value->at(tensor, fraction);
      return std::nullopt;
  }
  return std::nullopt;
}

MergeParameters ModelMergeJob::parameters_for(const std::string& name, double fraction, const MergeSlice* slice) const {
  MergeParameters out = slice ? slice->defaults : MergeParameters{weights, densities, gammas, epsilons, t, lambda};
  for (const auto& parameter : slice ? slice->varying : varying) {
    std::optional<double> value;
    for (const auto& setting : parameter.settings)
      if ((value = setting.at(name, fraction))) break;
    if (!value) value = parameter.fallback;
    const std::string owner = parameter.model >= 0 ? models[static_cast<std::size_t>(parameter.model)] + ": " : std::string();
    if (!value)
      throw InputError(owner + parameter.name + " has no value for tensor " + escaped_name(name) +
                       " (no filter matches it and no default applies; mergekit requires one)");
    if (!std::isfinite(*value)) throw InputError(owner + parameter.name + " for tensor " + escaped_name(name) + " must be finite");
    const bool fraction_parameter = parameter.name == "density" || parameter.name == "gamma";
    if (fraction_parameter && !(*value >= 0.0 && *value <= 1.0))
      throw InputError(owner + parameter.name + " for tensor " + escaped_name(name) + " must be in [0, 1], got " + format_number(*value));
    if (parameter.name == "epsilon" && !(*value >= 0.0))
      throw InputError(owner + "epsilon for tensor " + escaped_name(name) + " must be >= 0, got " + format_number(*value));
    const auto m = static_cast<std::size_t>(std::max(0, parameter.model));
    if (parameter.name == "weight") out.weights.at(m) = *value;
    else if (parameter.name == "density") out.densities.at(m) = *value;
    else if (parameter.name == "gamma") out.gammas.at(m) = *value;
    else if (parameter.name == "epsilon") out.epsilons.at(m) = *value;
    else if (parameter.name == "t") out.t = *value;
    else if (parameter.name == "lambda") out.lambda = *value;
    else throw InputError("a per-tensor value of " + parameter.name + ", which gradfix takes as one number");
  }
  // DELLA's keep probabilities density -/+ epsilon must lie in (0, 1), as mergekit requires
  // (where the delta is sparsified at all: density below 1 and above 0).
  if (model_merge_traits(method).sparsification == ModelMergeTraits::Sparsification::kRankedRandom)
    for (std::size_t m = 0; m < out.densities.size(); ++m) {
      const double density = out.densities[m], epsilon = out.epsilons.at(m);
      if (density < 1.0 && density > 0.0 && !(density - epsilon > 0.0 && density + epsilon < 1.0))
        throw InputError(models[m] + ": della's epsilon " + format_number(epsilon) + " with density " + format_number(density) + " for tensor " +
                         escaped_name(name) + ": density +/- epsilon must lie in (0, 1), as mergekit requires");
    }
  return out;
}

void ModelMergeJob::validate() const {
  const ModelMergeTraits& traits = model_merge_traits(method);
  const bool linear = method == ModelMergeMethod::kLinear || method == ModelMergeMethod::kPassthrough;
  const std::size_t n = models.size();
  require_given(out, "--out");
  if (n == 0) throw InputError("a merge needs at least one model");
  if (traits.sparsification == ModelMergeTraits::Sparsification::kNone)
    for (double density : densities)
      if (density != 1.0) throw InputError(std::string(model_merge_method_name(method)) + " does not sparsify: density must be 1");
  if (weights.size() != n || densities.size() != n)
    throw InputError("a merge needs one weight and one density per model");
  if (traits.sparsification == ModelMergeTraits::Sparsification::kOutliers && gammas.size() != n)
    throw InputError("breadcrumbs needs one gamma per model");
  for (double gamma : gammas)
    if (!(gamma >= 0.0 && gamma <= 1.0)) throw InputError("gamma must be in [0, 1], got " + format_number(gamma));
  if (traits.sparsification == ModelMergeTraits::Sparsification::kRankedRandom && epsilons.size() != n)
    throw InputError("della needs one epsilon per model");
  if (!linear && method != ModelMergeMethod::kNuslerp && method != ModelMergeMethod::kMultislerp &&
      method != ModelMergeMethod::kKarcher && base.empty())
    throw InputError(std::string(model_merge_method_name(method)) + " needs a base_model");
  if (method == ModelMergeMethod::kPassthrough && (n != 1 || !base.empty() || normalize))
    throw InputError("passthrough copies one model (times its scale), without a base_model or normalisation; got " + std::to_string(n) +
                     " model(s)" + (base.empty() ? "" : " and a base_model"));
  if (method == ModelMergeMethod::kSlerp && n != 1)
    throw InputError("slerp interpolates between the base and one other model; got " + std::to_string(n) + " besides the base");
  if (method == ModelMergeMethod::kSlerp && !std::isfinite(t)) throw InputError("slerp: t must be finite");
  if (vectors != MergeVectors::kTensor && method != ModelMergeMethod::kNuslerp &&
      !(method == ModelMergeMethod::kModelStock && vectors == MergeVectors::kRows))
    throw InputError(std::string(model_merge_method_name(method)) + " takes each tensor as one vector; rows or columns are for nuslerp "
                     "(and rows for model_stock)");
  if (method == ModelMergeMethod::kNuslerp && n != 2)
    throw InputError("nuslerp interpolates between two models; got " + std::to_string(n) + " besides the base");
  if (method == ModelMergeMethod::kArceeFusion && n != 1)
    throw InputError("arcee_fusion fuses one model into the base; got " + std::to_string(n) + " besides the base");
  if (method == ModelMergeMethod::kNearswap && n != 1)
    throw InputError("nearswap moves the base towards one other model; got " + std::to_string(n) + " besides the base");
  if (method == ModelMergeMethod::kNearswap && !(std::isfinite(t) && t >= 0.0))
    throw InputError("nearswap: t must be a finite number >= 0, got " + format_number(t));
  if (method == ModelMergeMethod::kMultislerp && !(std::isfinite(eps) && eps >= 0.0))
    throw InputError("multislerp: eps must be a finite number >= 0, got " + format_number(eps));
  if (method == ModelMergeMethod::kSce && !(select_topk >= 0.0 && select_topk <= 1.0))
    throw InputError("sce: select_topk must be in [0, 1], got " + format_number(select_topk));
  if (method == ModelMergeMethod::kKarcher && (max_iter < 0 || !(std::isfinite(tol) && tol >= 0.0)))
    throw InputError("karcher: max_iter must be >= 0 and tol a finite number >= 0, got " + std::to_string(max_iter) + " and " +
                     format_number(tol));
  if ((method == ModelMergeMethod::kRam || method == ModelMergeMethod::kRamplusTl) &&
      !(std::isfinite(ram_epsilon) && ram_epsilon >= 0.0 && std::isfinite(ram_r) && std::isfinite(ram_alpha)))
    throw InputError(std::string(model_merge_method_name(method)) + ": epsilon must be a finite number >= 0, r and alpha finite");
  if (method == ModelMergeMethod::kModelStock && n < 2)
    throw InputError("model_stock needs at least two models besides the base (their deltas' angle sets the interpolation); got " +
                     std::to_string(n));
  for (std::size_t m = 0; m < n; ++m) {
    if (!std::isfinite(weights[m])) throw InputError(models[m] + ": weight must be finite");
    if (!(densities[m] >= 0.0 && densities[m] <= 1.0))
      throw InputError(models[m] + ": density must be in [0, 1], got " + std::to_string(densities[m]));
  }
  if (!std::isfinite(lambda)) throw InputError("lambda must be finite");
  static const std::set<std::string> kPerModel = {"weight", "density", "gamma", "epsilon"}, kOwn = {"t", "lambda"};
  std::vector<const VaryingParameter*> all_varying;
  for (const auto& parameter : varying) all_varying.push_back(&parameter);
  for (const auto& slice : slices)
    for (const auto& parameter : slice.varying) all_varying.push_back(&parameter);
  for (const VaryingParameter* each : all_varying) {
    const VaryingParameter& parameter = *each;
    const bool per_model = kPerModel.count(parameter.name) != 0;
    if (!per_model && !kOwn.count(parameter.name))
      throw InputError("a per-tensor value of " + parameter.name + ", which gradfix takes as one number");
    if (per_model != (parameter.model >= 0) || parameter.model >= static_cast<int>(n))
      throw InputError("a per-tensor " + parameter.name + " for model index " + std::to_string(parameter.model) + " of " + std::to_string(n));
    if (parameter.settings.empty()) throw InputError("a per-tensor " + parameter.name + " without a setting");
    for (const auto& setting : parameter.settings)
      if (setting.kind == ParameterSetting::Kind::kGradient && setting.gradient.empty())
        throw InputError("a per-layer list of " + parameter.name + " without values");
  }
  // Mask-then-merge masks each model's delta from the base before any method sees it: every
  // method with a base and deltas from it. Merge-then-mask masks a sum of deltas: the methods
  // that form one.
  if (order == MergeOrder::kMaskThenMerge && (linear || method == ModelMergeMethod::kKarcher || base.empty()))
    throw InputError(std::string("gradfix.order mask-then-merge: ") + model_merge_method_name(method) +
                     (base.empty() ? std::string(" without a base_model") : std::string("")) +
                     " merges whole weights, not deltas from a base model, so there is no task vector to mask");
  if (order == MergeOrder::kMergeThenMask && (linear || traits.combination != ModelMergeTraits::Combination::kDeltas))
    throw InputError(std::string("gradfix.order: ") + model_merge_method_name(method) +
                     " merges whole weights (or interpolates them), not sums of deltas from a base; merge-then-mask goes with "
                     "task_arithmetic, ties, dare_*, breadcrumbs* and della* (mask-then-merge with every method that has a base)");
  if (order != MergeOrder::kNone && signs.size() != n)
    throw InputError(std::string("gradfix.order ") + merge_order_name(order) + " needs sign statistics (gradfix: {signs: FILE}) "
                     "for every model: got " + std::to_string(signs.size()) + " for " + std::to_string(n) + " models");
  if (order == MergeOrder::kNone && !signs.empty())
    throw InputError("sign statistics given without gradfix.order (mask-then-merge or merge-then-mask)");
  mask.validate();
  validate_slices();
  const std::string& source = vocabulary.source;
  if (source.empty() && (!vocabulary.tokens.empty() || vocabulary.pad_to_multiple_of != 0))
    throw InputError("tokenizer tokens or pad_to_multiple_of without a tokenizer source");
  if (!source.empty() && !slices.empty())
    throw InputError("a tokenizer source with slices is not implemented: gradfix aligns vocabularies of a merge of whole models");
  if (!source.empty() && order != MergeOrder::kNone)
    throw InputError("gradfix.order with a tokenizer source: the sign statistics have the base's vocabulary rows, not the output's");
  if (vocabulary.pad_to_multiple_of < 0 || vocabulary.pad_to_multiple_of > (1LL << 20))
    throw InputError("tokenizer.pad_to_multiple_of must be from 1 to 2^20, got " + std::to_string(vocabulary.pad_to_multiple_of));
}

void ModelMergeJob::validate_slices() const {
  if (slices.empty()) return;
  if (order != MergeOrder::kNone)
    throw InputError("gradfix.order with slices: gradient-sign masks need statistics of each stacked model; merge without slices, or "
                     "mask each source first (gradfix transport) and stack the results");
  const bool with_base = !slices.front().base.model.empty();
  for (std::size_t s = 0; s < slices.size(); ++s) {
    const MergeSlice& slice = slices[s];
    const std::string where = "slices[" + std::to_string(s) + "]";
    if (slice.models.size() != models.size())
      throw InputError(where + " merges " + std::to_string(slice.models.size()) + " model(s) besides the base, slices[0] " +
                       std::to_string(models.size()) + ": gradfix merges the same number in every slice");
    if (slice.base.model.empty() == with_base)
      throw InputError(where + (with_base ? " has no source from the base_model" : " has a base source and slices[0] none"));
    if (slice.defaults.weights.size() != models.size() || slice.defaults.densities.size() != models.size())
      throw InputError(where + ": one weight and one density per model are needed");
    std::vector<const MergeSliceSource*> sources;
    if (with_base) sources.push_back(&slice.base);
    for (const auto& source : slice.models) sources.push_back(&source);
    for (const MergeSliceSource* source : sources) {
      if (!(source->begin >= 0 && source->end > source->begin))
        throw InputError(where + ": " + escaped_name(source->model) + " layer_range [" + std::to_string(source->begin) + ", " +
                         std::to_string(source->end) + "] is not a range of layers (0 <= begin < end)");
      if (source->end - source->begin != sources.front()->end - sources.front()->begin)
        throw InputError(where + ": " + escaped_name(source->model) + " takes " + std::to_string(source->end - source->begin) + " layers and " +
                         escaped_name(sources.front()->model) + " " + std::to_string(sources.front()->end - sources.front()->begin) +
                         " (mergekit: \"All inputs to a slice must contain the same number of layers\")");
    }
  }
}

file_jobs::LayerName file_jobs::layer_name(const std::string& name) {
  static const std::regex kLayer(R"((?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.)");
  LayerName out;
  std::smatch match;
  if (!std::regex_search(name, match, kLayer) || match[1].length() > 9) return out;
  out.at = static_cast<std::size_t>(match.position(1));
  out.length = static_cast<std::size_t>(match[1].length());
  out.stack = name.substr(0, out.at);
  out.layer = std::stoll(match[1].str());
  return out;
}

std::map<std::string, double> file_jobs::layer_fractions(const std::vector<std::string>& names) {
  std::map<std::string, long long> index;
  long long layers = 0;
  for (const auto& name : names) {
    const long long layer = layer_name(name).layer;
    if (layer < 0) continue;
    index[name] = layer;
    layers = std::max(layers, layer + 1);
  }
  std::map<std::string, double> fractions;
  for (const auto& name : names) {
    const auto found = index.find(name);
    if (found == index.end()) fractions[name] = 0.0;
    else fractions[name] = layers > 1 ? static_cast<double>(found->second) / static_cast<double>(layers - 1) : 1.0;
  }
  return fractions;
}

namespace {

// A model whose float tensors read as another float dtype (mergekit's `dtype`: it loads every
// input in it before merging).
class CastReader : public WrappedReader {
 public:
  CastReader(std::unique_ptr<TensorReader> own, DType dtype)
      : WrappedReader(std::move(own), [dtype](TensorInfo& tensor) { if (dtype_is_float(tensor.dtype)) tensor.dtype = dtype; }), dtype_(dtype) {}
  void read_raw(const std::string& name, long long begin, long long count, void* target) const override {
    const DType stored = own().info(name).dtype;
    if (!dtype_is_float(stored) || stored == dtype_) return own().read_raw(name, begin, count, target);
    std::vector<unsigned char> raw(static_cast<std::size_t>(count) * dtype_size(stored));
    own().read_raw(name, begin, count, raw.data());
    convert_float(stored, raw.data(), dtype_, target, static_cast<std::size_t>(count));
  }

 private:
  DType dtype_;
};

// Mask-then-merge for the methods that do not sum deltas themselves: a model presented as base +
// its delta masked with its own statistics, in float64 (so that the method's delta from the
// base is the masked delta, exactly).
class MaskedReader : public WrappedReader {
 public:
  MaskedReader(std::unique_ptr<TensorReader> own, const TensorReader& base, const TensorReader& signs, const ModelMergeJob& job,
               const std::vector<TensorInfo>& layout, const std::set<std::string>& merged, SumsByTensor sums)
      : WrappedReader(std::move(own), [&merged](TensorInfo& tensor) { if (merged.count(tensor.name)) tensor.dtype = DType::kF64; }),
        base_(base), signs_(signs), job_(job), layout_(layout), sums_(std::move(sums)) {
    for (std::size_t t = 0; t < layout.size(); ++t)
      if (merged.count(layout[t].name)) index_[layout[t].name] = t;
  }
  void read_raw(const std::string& name, long long begin, long long count, void* target) const override {
    const auto found = index_.find(name);
    if (found == index_.end()) return own().read_raw(name, begin, count, target);
    const bool allow = job_.output.allow_nonfinite;
    const auto base = load<double>(base_, name, begin, count, allow);
    auto tau = load<double>(own(), name, begin, count, allow);
    for (std::size_t i = 0; i < tau.size(); ++i) tau[i] -= base[i];
    std::vector<double> masked;
    mask_chunk(job_.mode, job_.mask, layout_[found->second], Piece{found->second, begin, count}, tau, load<double>(signs_, name, begin, count, allow),
               sums_, masked);
    auto* out = static_cast<double*>(target);
    for (std::size_t i = 0; i < masked.size(); ++i) out[i] = base[i] + masked[i];
  }

 private:
  const TensorReader& base_;
  const TensorReader& signs_;
  const ModelMergeJob& job_;
  const std::vector<TensorInfo>& layout_;
  SumsByTensor sums_;
  std::map<std::string, std::size_t> index_;
};

// Wraps every model in a MaskedReader, its mask's sums (where the mode needs any) taken first over
// the ranks.
void mask_models_first(const ModelMergeJob& job, const Ranks& ranks, ModelMergeInputs& in, const ChunkedJob& chunked) {
  const auto& layout = chunked.layout();
  std::vector<Piece> merged;
  for (const auto& chunk : chunked.chunks())
    if (in.merged.count(layout[chunk.tensor].name)) merged.push_back(chunk);
  const bool allow = job.output.allow_nonfinite;
  for (std::size_t m = 0; m < in.models.size(); ++m) {
    SumsByTensor sums = mask_sums<double>(ranks, chunked.plan(), layout, job.mode, job.mask, merged,
                                          [&](const Piece& chunk, std::vector<double>& tau, std::vector<double>& statistics) {
                                            const std::string& name = layout[chunk.tensor].name;
                                            const auto base = load<double>(*in.base, name, chunk.begin, chunk.count, allow);
                                            tau = load<double>(*in.models[m], name, chunk.begin, chunk.count, allow);
                                            for (std::size_t i = 0; i < tau.size(); ++i) tau[i] -= base[i];
                                            statistics = load<double>(*in.signs[m], name, chunk.begin, chunk.count, allow);
                                          });
    in.models[m] = std::make_unique<MaskedReader>(std::move(in.models[m]), *in.base, *in.signs[m], job, layout, in.merged, std::move(sums));
  }
}

// The models, the base and the statistics, checked against each other and the options.
ModelMergeInputs open_model_merge_inputs(const ModelMergeJob& job, const Ranks& ranks) {
  ModelMergeInputs in;
  auto& base = in.base;
  auto& models = in.models;
  auto& signs = in.signs;
  auto& names = in.names;
  std::map<std::string, std::pair<std::size_t, double>> positions;  // with slices
  ranks.agree([&] {
    job.validate();
    if (job.slices.empty()) {
      base = open_reader(job.base.empty() ? job.models.front() : job.base);
      for (const auto& path : job.models) models.push_back(open_reader(path));
    } else {
      StackedModels stacked = stack_slices(job);
      in.sources = std::move(stacked.sources);
      base = std::move(stacked.base);
      models = std::move(stacked.models);
      positions = std::move(stacked.positions);
      in.files.layers = stacked.layers;
    }
    // Inputs rounded to mergekit's `dtype`, as mergekit loads them (before it aligns
    // vocabularies); float64 holds every stored value already.
    if (job.input_dtype && *job.input_dtype != DType::kF64 && !job.stored_inputs) {
      in.base = std::make_unique<CastReader>(std::move(in.base), *job.input_dtype);
      for (auto& model : in.models) model = std::make_unique<CastReader>(std::move(model), *job.input_dtype);
    }
    if (!job.vocabulary.source.empty()) align_vocabularies(job, in);
    else require_same_vocabulary(in);
    set_chat_template(job, in);
    const TensorSelector selector(job.output.include, job.output.exclude);
    for (const auto& name : selected_names(*base, selector))
      if (dtype_is_float(base->info(name).dtype)) names.push_back(name);
    require_selection(names, *base);
    for (const auto& model : models) {
      require_matching(*base, names, *model);
      require_float(*model, names, "merge");
    }
    for (const auto& path : job.signs) {
      signs.push_back(open_reader(path));
      require_matching(*base, names, *signs.back());
      require_float(*signs.back(), names, "merge");
    }
    if (job.slices.empty()) {
      const std::map<std::string, double> fractions = layer_fractions(names);
      for (const auto& name : names) in.parameters[name] = job.parameters_for(name, fractions.at(name));
    } else {
      for (const auto& name : names) {
        const auto& [slice, fraction] = positions.at(name);
        in.parameters[name] = job.parameters_for(name, fraction, &job.slices[slice]);
      }
    }
  });
  in.merged.insert(names.begin(), names.end());
  return in;
}

Metadata model_merge_metadata(const ModelMergeJob& job, const ModelMergeInputs& in) {
  using S = ModelMergeTraits::Sparsification;
  const S sparsification = model_merge_traits(job.method).sparsification;
  const auto& base = in.base;
  const auto& models = in.models;
  const auto& signs = in.signs;
  const std::size_t n = models.size();
  nlohmann::json options = {{"method", model_merge_method_name(job.method)}, {"variant", "mergekit"},
                            {"base", job.base.empty() ? "" : input_name(job.base)}, {"models", input_names(job.models)},
                            {"weights", job.weights}, {"densities", job.densities}, {"normalize", job.normalize},
                            {"lambda", job.lambda}, {"output", output_options_json(job.output)}};
  if (sparsification != S::kNone) options["rescale"] = job.rescale;
  if (sparsification == S::kRandom || sparsification == S::kRankedRandom) options["seed"] = job.seed;
  if (sparsification == S::kOutliers) options["gammas"] = job.gammas;
  if (sparsification == S::kRankedRandom) options["epsilons"] = job.epsilons;
  if (job.method == ModelMergeMethod::kSlerp || job.method == ModelMergeMethod::kNearswap) options["t"] = job.t;
  if (job.method == ModelMergeMethod::kMultislerp) options["eps"] = job.eps;
  if (job.method == ModelMergeMethod::kRam || job.method == ModelMergeMethod::kRamplusTl) options["epsilon"] = job.ram_epsilon;
  if (job.method == ModelMergeMethod::kRamplusTl) {
    options["r"] = job.ram_r;
    options["alpha"] = job.ram_alpha;
  }
  // Parameters that vary by tensor: their settings are in the configuration (gradfix.merge_config).
  for (const auto& parameter : job.varying)
    options["per_tensor"].push_back(parameter.model >= 0 ? parameter.name + " of " + input_name(job.models[static_cast<std::size_t>(parameter.model)])
                                                         : parameter.name);
  if (!job.slices.empty()) options["slices"] = slices_json(job);
  if (job.method == ModelMergeMethod::kSce) options["select_topk"] = job.select_topk;
  if (job.method == ModelMergeMethod::kKarcher) {
    options["max_iter"] = job.max_iter;
    options["tol"] = job.tol;
  }
  if (job.order != MergeOrder::kNone) {
    options["order"] = merge_order_name(job.order);
    options["signs"] = input_names(job.signs);
    options["mask"] = mask_options_json(job.mode, job.mask);
  }
  Inputs inputs;
  if (!job.base.empty()) inputs.emplace_back("base", base.get());
  for (std::size_t m = 0; m < n; ++m) inputs.emplace_back("model." + std::to_string(m), models[m].get());
  for (std::size_t m = 0; m < signs.size(); ++m) inputs.emplace_back("signs." + std::to_string(m), signs[m].get());
  Metadata metadata = output_metadata("merge", options, inputs);
  if (!job.config_json.empty()) metadata["gradfix.merge_config"] = job.config_json;
  return metadata;
}

// fp64 where a merged tensor is F64 in an input or the output.
bool model_merge_in_f64(const std::vector<TensorInfo>& layout, const ModelMergeInputs& in) {
  bool f64 = false;
  for (const auto& tensor : layout) {
    if (!in.merged.count(tensor.name)) continue;
    f64 = f64 || tensor.dtype == DType::kF64 || in.base->info(tensor.name).dtype == DType::kF64;
    for (const auto& reader : in.models) f64 = f64 || reader->info(tensor.name).dtype == DType::kF64;
    for (const auto& reader : in.signs) f64 = f64 || reader->info(tensor.name).dtype == DType::kF64;
  }
  return f64;
}

// DARE keeps entry i of model m's delta when its draw falls below the model's density there.
bool dare_keeps(const ModelMergeJob& job, double density, std::size_t m, std::uint64_t key, long long index) {
  return density >= 1.0 || uniform_at(job.seed ^ mix_bits(m + 1), key, index, 0) < density;
}

// sums[i] += values[i] * weight with one rounding (a fused multiply-add), as torch's float32
// addcmul_ kernel computes it. In an FMA copy as well, chosen at start-up: without the
// instruction std::fma is a library call, correctly rounded too, so the result is the same.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("fma", "default")))
#endif
void add_products(float* sums, const float* values, float weight, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) sums[i] = std::fma(values[i], weight, sums[i]);
}

// One operation's result as torch gives it in `dtype` (F32, BF16 or F16): computed in float32
// (the double result of one +, -, * or / on float32 operands rounds to float32 as float32
// arithmetic would), then, for a 16-bit dtype, rounded to it.
double round_in(DType dtype, double value) {
  const float single = static_cast<float>(value);
  if (dtype == DType::kF32) return single;
  return dtype == DType::kBF16 ? bf16_to_f32(f32_to_bf16(single)) : f16_to_f32(f32_to_f16(single));
}

// mergekit's rescale (RescaleNorm.l1) of a sparsified delta: per tensor and model,
// ||delta||_1 / ||kept delta||_1, left at 1 when either norm is below 1e-7 or nothing was dropped
// (density 1). DARE rescales by default, TIES only with `rescale: true`. `sparsify(m, chunk,
// values)` zeroes what the method drops. The norms are exact sums, so the factor is the same at
// any number of ranks. `delta(m, chunk)` gives model m's delta there.
template <typename DeltaOf, typename Sparsify>
std::map<std::size_t, std::vector<double>> l1_rescales(const ModelMergeJob& job, const ModelMergeInputs& in, const Ranks& ranks,
                                                       const ChunkedJob& chunked, const ChunksByTensor& tensors, const DeltaOf& delta,
                                                       const Sparsify& sparsify, DType rounding = DType::kF64) {
  std::map<std::size_t, std::vector<double>> rescales;  // by tensor
  for (const auto& entry : tensors) {
    // Plain names, not a structured binding: C++17 lambdas (clang) cannot capture those.
    const std::size_t t = entry.first;
    const std::vector<Piece>& mine = entry.second;
    const MergeParameters& parameters = in.of(chunked.layout()[t].name);
    for (std::size_t m = 0; m < job.models.size(); ++m) {
      double factor = 1.0;
      if (job.rescale && parameters.densities[m] < 1.0) {
        ExactSum before, after;
        for (const Piece& chunk : mine) {
          auto values = delta(m, chunk);
          for (const auto value : values) before.add(std::fabs(value));
          sparsify(m, chunk, values);
          for (const auto value : values) after.add(std::fabs(value));
        }
        double b = tensor_total(ranks, chunked, t, before), a = tensor_total(ranks, chunked, t, after);
        // In a 16-bit dtype mergekit's two norms and their ratio are tensors of it, each rounded.
        if (rounding != DType::kF64) b = round_in(rounding, b), a = round_in(rounding, a);
        if (b >= 1e-7 && a >= 1e-7) factor = rounding != DType::kF64 ? round_in(rounding, b / a) : b / a;
      }
      rescales[t].push_back(factor);
    }
  }
  return rescales;
}

// A magnitude sparsification of one delta within one tensor: TIES keeps its k largest
// magnitudes; Model Breadcrumbs (mergekit's magnitude_outliers) keeps int(density * n) entries
// after the n_bot = max(0, n - int(density * n) - int(gamma * n)) smallest, dropping the largest
// (at most int(gamma * n) of them) above those.
struct MagnitudeSparsification {
  Trim keep;       // the k largest survive...
  Trim outliers;   // ...less these (breadcrumbs)
  bool drop_outliers = false;
  bool drop_all = false;

  template <typename V>
  void apply(const Piece& chunk, std::vector<V>& values) const {
    if (drop_all) {
      std::fill(values.begin(), values.end(), V(0));
      return;
    }
    std::vector<V> top;
    if (drop_outliers) {
      top = values;
      outliers.apply(chunk, top);
    }
    keep.apply(chunk, values);
    for (std::size_t i = 0; i < top.size(); ++i)
      if (top[i] != V(0)) values[i] = V(0);
  }
};

// The sparsifications of every model's delta, per tensor (trim.hpp's Trim: exact counts at any P).
template <typename DeltaOf>
std::map<std::size_t, std::vector<MagnitudeSparsification>> magnitude_sparsifications(const ModelMergeJob& job, const ModelMergeInputs& in,
                                                                                     const Ranks& ranks, const ChunkedJob& chunked,
                                                                                     const ChunksByTensor& tensors, const DeltaOf& delta) {
  const bool breadcrumbs = model_merge_traits(job.method).sparsification == ModelMergeTraits::Sparsification::kOutliers;
  std::map<std::size_t, std::vector<MagnitudeSparsification>> out;  // by tensor
  for (const auto& [t, mine] : tensors) {
    const long long numel = chunked.layout()[t].numel();
    const bool split = chunked.plan().is_split(t);
    const MergeParameters& parameters = in.of(chunked.layout()[t].name);
    for (std::size_t m = 0; m < job.models.size(); ++m) {
      auto values = [&](const Piece& chunk) { return delta(m, chunk); };
      MagnitudeSparsification sparsification;
      const double density = parameters.densities[m];
      if (!breadcrumbs) {
        sparsification.keep = exact_trim(ranks, mergekit_keep_count(numel, density), numel, split, mine, values);
      } else if (density < 1.0) {
        const auto target = static_cast<long long>(density * static_cast<double>(numel));
        const auto top = static_cast<long long>(parameters.gammas[m] * static_cast<double>(numel));
        const long long bottom = std::max(0LL, numel - target - top);
        const long long above = numel - bottom - target;  // the largest, dropped
        sparsification.drop_all = target <= 0;
        if (!sparsification.drop_all) {
          sparsification.keep = exact_trim(ranks, numel - bottom, numel, split, mine, values);
          if (above > 0) sparsification.outliers = exact_trim(ranks, above, numel, split, mine, values);
          sparsification.drop_outliers = above > 0;
        }
      }
      out[t].push_back(std::move(sparsification));
    }
  }
  return out;
}

// The merges that sum models or their deltas (every method but slerp and nuslerp) of this rank's
// chunks, in the compute type V (fp32 as mergekit computes a float32 merge; fp64 with F64),
// written through `chunked`. Per model: the delta M_m - base, masked first with mask-then-merge,
// sparsified (TIES's or Breadcrumbs' magnitude trims, DARE's drops) and rescaled, weighted; then
// mixed (TIES's sign election or a plain sum, normalised), masked with merge-then-mask, and added
// to the base times lambda.
template <typename V>
class DeltaMerge {
 public:
  DeltaMerge(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked)
      : job_(job), traits_(model_merge_traits(job.method)), ranks_(ranks), in_(in), chunked_(chunked), layout_(chunked.layout()),
        allow_(job.output.allow_nonfinite), rounding_(operation_rounding(job)) {
    for (const auto& chunk : chunked.chunks())
      if (in.merged.count(layout_[chunk.tensor].name)) merged_chunks_.push_back(chunk);
  }

  // Returns the number of merged entries this rank wrote.
  long long run(const Metadata& metadata) {
    if (job_.order == MergeOrder::kMaskThenMerge) prepare_delta_masks();
    prepare_sparsification();
    if (job_.order == MergeOrder::kMergeThenMask)
      merged_sums_ = mask_sums<V>(ranks_, chunked_.plan(), layout_, job_.mode, job_.mask, merged_chunks_,
                                  [&](const Piece& chunk, std::vector<V>& values, std::vector<V>& statistics) {
                                    const auto mixed = mixed_of(chunk);
                                    values.assign(mixed.begin(), mixed.end());
                                    statistics = summed_signs(chunk);
                                  });
    long long elements = 0;
    write_merged(job_, in_, chunked_, metadata, elements,
                 [&](const Piece& chunk) { return is(ModelMergeMethod::kLinear) || is(ModelMergeMethod::kPassthrough) ? linear_of(chunk) : merged_of(chunk); });
    return elements;
  }

 private:
  bool is(ModelMergeMethod method) const { return job_.method == method; }
  using Sparsification = ModelMergeTraits::Sparsification;
  bool dare() const { return traits_.sparsification == Sparsification::kRandom; }
  bool della() const { return traits_.sparsification == Sparsification::kRankedRandom; }
  // TIES and Model Breadcrumbs sparsify by magnitude.
  bool trims() const { return traits_.sparsification == Sparsification::kMagnitude || traits_.sparsification == Sparsification::kOutliers; }
  bool consensus() const { return traits_.consensus; }
  std::size_t models() const { return in_.models.size(); }

  std::vector<V> load_of(const TensorReader& reader, const Piece& chunk) const {
    return load<V>(reader, layout_[chunk.tensor].name, chunk.begin, chunk.count, allow_);
  }

  // M_m - base; `reference` is the base's chunk when the caller has it already.
  std::vector<V> raw_delta(std::size_t m, const Piece& chunk, const std::vector<V>* reference = nullptr) const {
    auto values = load_of(*in_.models[m], chunk);
    const auto loaded = reference ? std::vector<V>() : load_of(*in_.base, chunk);
    const auto& base_values = reference ? *reference : loaded;
    for (std::size_t i = 0; i < values.size(); ++i) values[i] -= base_values[i];
    if constexpr (sizeof(V) == 4)  // rounds() only for float
      if (rounds()) round_all(values.data(), values.size());
    return values;
  }

  // Mask-then-merge: each delta is masked with its own model's statistics before anything else
  // (DARE's drops, TIES's trims), as gradfix merge masks task vectors before merging them.
  void prepare_delta_masks() {
    delta_sums_.resize(models());
    for (std::size_t m = 0; m < models(); ++m)
      delta_sums_[m] = mask_sums<V>(ranks_, chunked_.plan(), layout_, job_.mode, job_.mask, merged_chunks_,
                                    [&](const Piece& chunk, std::vector<V>& values, std::vector<V>& statistics) {
                                      values = raw_delta(m, chunk);
                                      statistics = load_of(*in_.signs[m], chunk);
                                    });
  }

  std::vector<V> delta(std::size_t m, const Piece& chunk, const std::vector<V>* reference = nullptr) const {
    auto values = raw_delta(m, chunk, reference);
    if (job_.order != MergeOrder::kMaskThenMerge) return values;
    std::vector<V> masked;
    mask_chunk(job_.mode, job_.mask, layout_[chunk.tensor], chunk, values, load_of(*in_.signs[m], chunk), delta_sums_[m], masked);
    return masked;
  }

  // Each tensor's trims (exact counts) and each sparsified delta's L1 rescale factor.
  void prepare_sparsification() {
    const ChunksByTensor tensors = merged_tensors_here(chunked_, in_.merged);
    auto delta_of = [&](std::size_t m, const Piece& chunk) { return delta(m, chunk); };
    if (trims()) {
      trims_ = magnitude_sparsifications(job_, in_, ranks_, chunked_, tensors, delta_of);
      rescales_ = l1_rescales(
          job_, in_, ranks_, chunked_, tensors, delta_of,
          [&](std::size_t m, const Piece& chunk, std::vector<V>& values) { trims_.at(chunk.tensor)[m].apply(chunk, values); }, rounding_);
    }
    if (della())
      rescales_ = l1_rescales(job_, in_, ranks_, chunked_, tensors, delta_of, [&](std::size_t m, const Piece& chunk, std::vector<V>& values) {
        const std::vector<char> keep = della_keeps(m, chunk);
        for (std::size_t i = 0; i < values.size(); ++i)
          if (keep[i] == 0) values[i] = 0;
      });
    if (dare())
      rescales_ = l1_rescales(job_, in_, ranks_, chunked_, tensors, delta_of, [&](std::size_t m, const Piece& chunk, std::vector<V>& values) {
        const std::uint64_t key = tensor_key_of(layout_[chunk.tensor].name);
        const double density = parameters(chunk).densities[m];
        for (std::size_t i = 0; i < values.size(); ++i)
          if (!dare_keeps(job_, density, m, key, chunk.begin + static_cast<long long>(i))) values[i] = 0;
      });
  }

  // Model m's delta on a chunk, sparsified, rescaled and weighted.
  std::vector<double> weighted_delta(std::size_t m, const Piece& chunk, const std::vector<V>& base_values) const {
    auto values = delta(m, chunk, &base_values);
    if (trims()) trims_.at(chunk.tensor)[m].apply(chunk, values);
    if (rounds()) return rounded_weighted(m, chunk, std::vector<float>(values.begin(), values.end()));
    std::vector<double> out(values.begin(), values.end());
    const double weight = parameters(chunk).weights[m];
    if (trims()) {
      // Rescaled, then weighted: (delta * factor) * weight, entry by entry.
      const double factor = rescales_.at(chunk.tensor)[m];
      for (auto& value : out) value = value * factor * weight;
      return out;
    }
    if (dare() || della()) {
      const double factor = rescales_.at(chunk.tensor)[m];
      const std::vector<char> dropped = dropped_entries(m, chunk);
      for (std::size_t i = 0; i < out.size(); ++i) out[i] = dropped[i] ? 0.0 : out[i] * factor;
    }
    for (auto& value : out) value *= weight;
    return out;
  }

  // Whether DARE's draws or DELLA's ranked draws drop each entry of model m's delta on `chunk`.
  std::vector<char> dropped_entries(std::size_t m, const Piece& chunk) const {
    std::vector<char> dropped(static_cast<std::size_t>(chunk.count));
    if (della()) {
      const std::vector<char> keep = della_keeps(m, chunk);
      for (std::size_t i = 0; i < dropped.size(); ++i) dropped[i] = keep[i] == 0;
      return dropped;
    }
    const std::uint64_t key = tensor_key_of(layout_[chunk.tensor].name);
    const double density = parameters(chunk).densities[m];
    for (std::size_t i = 0; i < dropped.size(); ++i) dropped[i] = !dare_keeps(job_, density, m, key, chunk.begin + static_cast<long long>(i));
    return dropped;
  }

  // weighted_delta in `rounding_`, each operation rounded as mergekit's tensors in that dtype
  // are: the rescale factor and the weight are tensors of it, DARE's division by the factor runs
  // in float32 (mergekit draws its mask in float32) and is rounded once.
  std::vector<double> rounded_weighted(std::size_t m, const Piece& chunk, std::vector<float> values) const {
    const float weight = static_cast<float>(round(parameters(chunk).weights[m]));
    if (trims()) {
      const auto factor = static_cast<float>(rescales_.at(chunk.tensor)[m]);
      if (factor != 1.0f) {
        for (auto& value : values) value *= factor;
        round_all(values.data(), values.size());
      }
    }
    if (dare() || della()) {
      const auto factor = static_cast<float>(rescales_.at(chunk.tensor)[m]);
      const std::vector<char> dropped = dropped_entries(m, chunk);
      for (std::size_t i = 0; i < values.size(); ++i) values[i] = dropped[i] ? 0.0f : values[i] * factor;
      round_all(values.data(), values.size());
    }
    for (auto& value : values) value *= weight;
    round_all(values.data(), values.size());
    return std::vector<double>(values.begin(), values.end());
  }

  // DELLA's MAGPRUNE: whether each entry of model m's delta on `chunk` is kept. The delta's
  // entries are ranked by magnitude within their fiber along dim 1 (a matrix's row; a vector is
  // one fiber; ties in index order), rank r of n kept with probability density - epsilon + 2
  // epsilon (r - 1) / (n - 1) (density where n = 1), drawn as DARE draws: from (seed, model,
  // tensor, element) alone, so at any number of ranks. The fibers that reach into the chunk are
  // read whole. Density 1 keeps everything, as mergekit leaves such a delta alone.
  std::vector<char> della_keeps(std::size_t m, const Piece& chunk) const {
    const TensorInfo& info = layout_[chunk.tensor];
    const double density = parameters(chunk).densities[m], epsilon = parameters(chunk).epsilons[m];
    std::vector<char> keep(static_cast<std::size_t>(chunk.count), 1);
    if (density >= 1.0 || chunk.count == 0) return keep;
    const long long numel = info.numel();
    const long long fiber = info.shape.size() < 2 ? numel : info.shape[1];
    const long long stride = info.shape.size() < 2 ? 1 : numel / (info.shape[0] * fiber);
    const long long block = fiber * stride;  // one index along dim 0: `stride` fibers, interleaved
    const long long first = chunk.begin / block * block, last = (chunk.begin + chunk.count + block - 1) / block * block;
    const std::vector<V> values = delta(m, Piece{chunk.tensor, first, last - first});
    const std::uint64_t key = tensor_key_of(info.name), seed = job_.seed ^ mix_bits(m + 1);
    std::vector<long long> order(static_cast<std::size_t>(fiber));
    for (long long b = first; b < last; b += block)
      for (long long r = 0; r < stride; ++r) {
        auto at = [&](long long j) { return b + r + j * stride; };
        std::iota(order.begin(), order.end(), 0LL);
        std::stable_sort(order.begin(), order.end(), [&](long long x, long long y) {
          return std::fabs(values[static_cast<std::size_t>(at(x) - first)]) < std::fabs(values[static_cast<std::size_t>(at(y) - first)]);
        });
        for (long long rank = 0; rank < fiber; ++rank) {
          const long long index = at(order[static_cast<std::size_t>(rank)]);
          if (index < chunk.begin || index >= chunk.begin + chunk.count) continue;
          const double probability =
              fiber > 1 ? density - epsilon + 2.0 * epsilon * static_cast<double>(rank) / static_cast<double>(fiber - 1) : density;
          keep[static_cast<std::size_t>(index - chunk.begin)] = uniform_at(seed, key, index, 0) < probability ? 1 : 0;
        }
      }
    return keep;
  }

  // The weights, densities, gammas and lambda of the chunk's tensor.
  const MergeParameters& parameters(const Piece& chunk) const { return in_.of(layout_[chunk.tensor].name); }
  double weight_sum(const Piece& chunk) const {
    double sum = 0.0;
    for (double w : parameters(chunk).weights) sum += w;
    return sum;
  }

  // The merged delta of a chunk, before lambda.
  std::vector<double> mixed_of(const Piece& chunk) const { return mixed_of(chunk, load_of(*in_.base, chunk)); }
  // The same with the base's values on the chunk.
  std::vector<double> mixed_of(const Piece& chunk, const std::vector<V>& base_values) const {
    const auto count = static_cast<std::size_t>(chunk.count);
    std::vector<std::vector<double>> deltas;
    for (std::size_t m = 0; m < models(); ++m) deltas.push_back(weighted_delta(m, chunk, base_values));
    std::vector<double> mixed(count, 0.0);
    if (rounds()) {
      rounded_mix(chunk, deltas, mixed);
      return mixed;
    }
    if (consensus()) {
      std::vector<const double*> pointers;
      for (const auto& values : deltas) pointers.push_back(values.data());
      mergekit_consensus(pointers, parameters(chunk).weights, job_.normalize, chunk.count, mixed.data());
      return mixed;
    }
    const double weight_sum = this->weight_sum(chunk);
    const double divisor = std::fabs(weight_sum) < 1e-8 ? 1.0 : weight_sum;
    for (std::size_t i = 0; i < count; ++i) {
      for (std::size_t m = 0; m < models(); ++m) mixed[i] += deltas[m][i];
      if (job_.normalize) mixed[i] /= divisor;
    }
    return mixed;
  }

  // The mix of the weighted deltas in `rounding_`, as mergekit's tensors in it give it: sums
  // over the models accumulate in float32 (torch's accumulation type for 16-bit floats, and
  // float32's own) and are rounded once; the weights are tensors of that dtype; TIES elects the sign of
  // the rounded sum (+ where it is 0) and sums the agreeing deltas and their weights.
  void rounded_mix(const Piece& chunk, const std::vector<std::vector<double>>& deltas, std::vector<double>& mixed) const {
    std::vector<float> weights;
    for (double w : parameters(chunk).weights) weights.push_back(static_cast<float>(round(w)));
    float weight_sum = 0.0f;
    for (float w : weights) weight_sum += w;
    const auto all_weights = static_cast<float>(round(weight_sum));
    const std::size_t count = mixed.size();
    // Model by model over the chunk, so that each loop is a vector operation; each entry's sums
    // still run over the models in order.
    std::vector<float> sum(count, 0.0f), divisor(count, 0.0f), sign(count, 0.0f), delta(count);
    if (consensus()) {
      for (const auto& values : deltas)
        for (std::size_t i = 0; i < count; ++i) sign[i] += static_cast<float>(values[i]);
      for (std::size_t i = 0; i < count; ++i) sign[i] = sign[i] >= 0.0f ? 1.0f : -1.0f;
    }
    for (std::size_t m = 0; m < deltas.size(); ++m) {
      for (std::size_t i = 0; i < count; ++i) delta[i] = static_cast<float>(deltas[m][i]);
      if (!consensus()) {
        for (std::size_t i = 0; i < count; ++i) sum[i] += delta[i];
        continue;
      }
      const float weight = weights[m];
      for (std::size_t i = 0; i < count; ++i) {
        const bool agrees = delta[i] * sign[i] > 0.0f;
        sum[i] += agrees ? delta[i] : 0.0f;
        divisor[i] += agrees ? weight : 0.0f;
      }
    }
    round_all(sum.data(), count);
    if (job_.normalize) {
      if (consensus()) {
        round_all(divisor.data(), count);
        for (std::size_t i = 0; i < count; ++i) sum[i] /= divisor[i] == 0.0f ? 1.0f : divisor[i];
      } else {
        const float by = std::fabs(all_weights) < 1e-8f ? 1.0f : all_weights;
        for (std::size_t i = 0; i < count; ++i) sum[i] /= by;
      }
      round_all(sum.data(), count);
    }
    std::copy(sum.begin(), sum.end(), mixed.begin());
  }

  // Merge-then-mask: the merged delta is masked with sum_m sign(s_m), as gradfix merge does for
  // task vectors.
  std::vector<V> summed_signs(const Piece& chunk) const { return sign_sum<V>(in_.signs, layout_[chunk.tensor].name, chunk, allow_); }

  // base + lambda * the mixed delta (masked with merge-then-mask).
  std::vector<double> merged_of(const Piece& chunk) const {
    const auto reference = load_of(*in_.base, chunk);
    auto mixed = mixed_of(chunk, reference);
    if (job_.order == MergeOrder::kMergeThenMask) {
      const std::vector<V> unmasked(mixed.begin(), mixed.end());
      std::vector<V> masked;
      mask_chunk(job_.mode, job_.mask, layout_[chunk.tensor], chunk, unmasked, summed_signs(chunk), merged_sums_, masked);
      mixed.assign(masked.begin(), masked.end());
    }
    std::vector<double> result(mixed.size());
    const double lambda = parameters(chunk).lambda;
    if (rounds()) {
      // mergekit multiplies by lambda only when it is not 1, by a float32 scalar.
      const auto factor = static_cast<float>(lambda);
      std::vector<float> values(mixed.begin(), mixed.end());
      if (lambda != 1.0) {
        for (auto& value : values) value *= factor;
        round_all(values.data(), values.size());
      }
      for (std::size_t i = 0; i < values.size(); ++i) values[i] += static_cast<float>(reference[i]);
      round_all(values.data(), values.size());
      std::copy(values.begin(), values.end(), result.begin());
      return result;
    }
    for (std::size_t i = 0; i < result.size(); ++i) result[i] = reference[i] + lambda * mixed[i];
    return result;
  }

  // linear: sum_m w_m M_m, normalised by the weights; passthrough: its one model times its scale
  // (held as its weight, never normalised).
  std::vector<double> linear_of(const Piece& chunk) const {
    if (rounds()) return is(ModelMergeMethod::kPassthrough) ? rounded_passthrough_of(chunk) : float32_linear_of(chunk);
    std::vector<double> result(static_cast<std::size_t>(chunk.count), 0.0);
    const std::vector<double>& weights = parameters(chunk).weights;
    for (std::size_t m = 0; m < models(); ++m) {
      const auto values = load_of(*in_.models[m], chunk);
      for (std::size_t i = 0; i < result.size(); ++i) result[i] += weights[m] * values[i];
    }
    const double weight_sum = this->weight_sum(chunk);
    if (job_.normalize && weight_sum != 0.0)
      for (auto& value : result) value /= weight_sum;
    return result;
  }

  // linear as mergekit computes it in every dtype but float64: in float32, the weights as float32
  // values, each model's product added to the sum in turn (torch's addcmul_, whose vector kernel
  // fuses the multiply and the add), the sum divided by the float32 sum of the weights; the
  // output dtype's rounding comes once, when it is written.
  std::vector<double> float32_linear_of(const Piece& chunk) const {
    const std::vector<double>& weights = parameters(chunk).weights;
    std::vector<float> sums(static_cast<std::size_t>(chunk.count), 0.0f);
    float weight_sum = 0.0f;
    for (std::size_t m = 0; m < models(); ++m) {
      const float weight = static_cast<float>(weights[m]);
      weight_sum += weight;
      const auto values = load_of(*in_.models[m], chunk);
      if constexpr (sizeof(V) == 4) add_products(sums.data(), values.data(), weight, sums.size());  // rounds() only for float
    }
    if (job_.normalize && weight_sum != 0.0f)
      for (auto& sum : sums) sum /= weight_sum;
    return std::vector<double>(sums.begin(), sums.end());
  }

  // passthrough in `rounding_`: its model times its scale as a float32 scalar, rounded.
  std::vector<double> rounded_passthrough_of(const Piece& chunk) const {
    const double scale = static_cast<float>(parameters(chunk).weights[0]);
    const auto values = load_of(*in_.models[0], chunk);
    std::vector<double> result(values.size());
    for (std::size_t i = 0; i < values.size(); ++i) result[i] = round(scale * values[i]);
    return result;
  }

  // mergekit computes a merge in its `dtype`: every operation's result is rounded to it.
  // `rounding_` is that dtype where gradfix does the same (the delta merges of a float32,
  // bfloat16 or float16 merge without gradient-sign masks, unless gradfix: {arithmetic: double}
  // or {inputs: stored}), else F64, which rounds nothing (computed in double, rounded once).
  static DType operation_rounding(const ModelMergeJob& job) {
    if (!job.arithmetic_in_dtype || job.stored_inputs || !job.input_dtype || job.order != MergeOrder::kNone || sizeof(V) != 4) return DType::kF64;
    return *job.input_dtype == DType::kBF16 || *job.input_dtype == DType::kF16 || *job.input_dtype == DType::kF32 ? *job.input_dtype : DType::kF64;
  }
  bool rounds() const { return rounding_ != DType::kF64; }
  // One operation's result as torch gives it in `rounding_` (round_in).
  double round(double value) const { return round_in(rounding_, value); }
  // round() over an array, the dtype chosen once so that the loop vectorises.
  void round_all(float* values, std::size_t count) const {
    if (rounding_ == DType::kF32) return;
    if (rounding_ == DType::kBF16) {
      for (std::size_t i = 0; i < count; ++i) {
        std::uint32_t bits;
        std::memcpy(&bits, values + i, sizeof bits);
        bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
        std::memcpy(values + i, &bits, sizeof bits);
      }
      return;
    }
    for (std::size_t i = 0; i < count; ++i) values[i] = f16_to_f32(f32_to_f16(values[i]));
  }

  const ModelMergeJob& job_;
  const ModelMergeTraits& traits_;
  const Ranks& ranks_;
  const ModelMergeInputs& in_;
  ChunkedJob& chunked_;
  const std::vector<TensorInfo>& layout_;
  const bool allow_;
  const DType rounding_;
  std::vector<Piece> merged_chunks_;  // this rank's chunks of the merged tensors (the others are copied from the base)
  std::vector<SumsByTensor> delta_sums_;  // mask-then-merge: each model's mask sums
  SumsByTensor merged_sums_;              // merge-then-mask
  std::map<std::size_t, std::vector<MagnitudeSparsification>> trims_;  // by tensor, per model
  std::map<std::size_t, std::vector<double>> rescales_;                 // by tensor, per model
};

}  // namespace

JobSummary run_model_merge(const ModelMergeJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  if (ranks.is_root())
    for (const auto& note : job.notes) log << "merge: " << note << "\n";
  ModelMergeInputs in = open_model_merge_inputs(job, ranks);
  std::vector<TensorInfo> layout;
  for (const auto& tensor : in.base->tensors()) layout.push_back(output_info(tensor, job.output));
  // Chunks of at most 64K entries: a merge keeps several buffers of a chunk per model, and at this
  // size they stay in the caches (a 100M-parameter TIES merge: 5.1 s against 7.5 s with chunks of
  // 4M, and less memory).
  constexpr long long kMergeChunkElements = 1LL << 16;
  ChunkedJob chunked(ranks, "merge", layout, kMergeChunkElements);
  const Metadata metadata = model_merge_metadata(job, in);
  if (job.order == MergeOrder::kMaskThenMerge && model_merge_traits(job.method).combination != ModelMergeTraits::Combination::kDeltas)
    mask_models_first(job, ranks, in, chunked);
  JobSummary summary;
  const bool f64 = model_merge_in_f64(layout, in);
  if (model_merge_traits(job.method).combination != ModelMergeTraits::Combination::kDeltas)
    summary.elements = merge_whole_tensors(job, ranks, in, chunked, metadata, f64);
  else if (f64) summary.elements = DeltaMerge<double>(job, ranks, in, chunked).run(metadata);
  else summary.elements = DeltaMerge<float>(job, ranks, in, chunked).run(metadata);
  chunked.commit(job.base.empty() ? job.models.front() : job.base, in.files);
  std::vector<long long> elements = {summary.elements};
  ranks.reduce_statistics(elements);
  summary.elements = elements[0];
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.tensors_changed = static_cast<long long>(in.names.size());
  summary.bytes_written = chunked.bytes();
  if (ranks.is_root())
    log << "merge " << model_merge_method_name(job.method) << " (mergekit rules"
        << (job.order == MergeOrder::kNone ? std::string() : std::string(", ") + merge_order_name(job.order) + " " + mask_mode_name(job.mode))
        << ") of " << in.models.size() << " models: " << in.names.size() << " of "
        << layout.size() << " tensors (" << summary.elements << " elements) merged, written to " << job.out << rank_note(ranks) << "\n";
  return summary;
}

}  // namespace gradfix
