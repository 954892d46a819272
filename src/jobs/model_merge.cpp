// gradfix merge --config: whole models merged by mergekit's rules (linear, task_arithmetic, ties,
// dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, slerp, nuslerp, nearswap, model_stock,
// multislerp),
// with gradient-sign masks before or after the sums of deltas.
#include "file_jobs.hpp"
#include "gradfix/io/exact_sum.hpp"

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
      {M::kSlerp,            "slerp",            S::kNone,       false,    C::kSpherical, false,    false},
      {M::kNuslerp,          "nuslerp",          S::kNone,       false,    C::kSpherical, false,    false},
      {M::kNearswap,         "nearswap",         S::kNone,       false,    C::kNearswap,  false,    false},
      {M::kModelStock,       "model_stock",      S::kNone,       false,    C::kModelStock, false,   false},
      {M::kMultislerp,       "multislerp",       S::kNone,       false,    C::kMultislerp, true,    false}};
  return kMethods;
}

const ModelMergeTraits& model_merge_traits(ModelMergeMethod method) {
  for (const auto& traits : model_merge_methods())
    if (traits.method == method) return traits;
  GRADFIX_CHECK(false, "a merge method without traits");
}

const char* model_merge_method_name(ModelMergeMethod method) { return model_merge_traits(method).name; }

namespace {

struct ModelMergeInputs {
  Reader base;  // the base model (linear without one: the first model, for the layout and copies)
  std::vector<Reader> models;
  std::vector<Reader> signs;
  std::vector<std::string> names;  // the merged tensors: the base's selected float tensors
  std::set<std::string> merged;    // the same, for lookups
};

// The models, the base and the statistics, checked against each other and the options.
ModelMergeInputs open_model_merge_inputs(const ModelMergeJob& job, const Ranks& ranks) {
  const ModelMergeTraits& traits = model_merge_traits(job.method);
  const bool linear = job.method == ModelMergeMethod::kLinear;
  const std::size_t n = job.models.size();
  ModelMergeInputs in;
  auto& base = in.base;
  auto& models = in.models;
  auto& signs = in.signs;
  auto& names = in.names;
  ranks.agree([&] {
    if (n == 0) throw InputError("a merge needs at least one model");
    if (traits.sparsification == ModelMergeTraits::Sparsification::kNone)
      for (double density : job.densities)
        if (density != 1.0) throw InputError(std::string(model_merge_method_name(job.method)) + " does not sparsify: density must be 1");
    if (job.weights.size() != n || job.densities.size() != n)
      throw InputError("a merge needs one weight and one density per model");
    if (traits.sparsification == ModelMergeTraits::Sparsification::kOutliers && job.gammas.size() != n)
      throw InputError("breadcrumbs needs one gamma per model");
    for (double gamma : job.gammas)
      if (!(gamma >= 0.0 && gamma <= 1.0)) throw InputError("gamma must be in [0, 1], got " + format_number(gamma));
    if (!linear && job.method != ModelMergeMethod::kNuslerp && job.method != ModelMergeMethod::kMultislerp && job.base.empty())
      throw InputError(std::string(model_merge_method_name(job.method)) + " needs a base_model");
    if (job.method == ModelMergeMethod::kSlerp && n != 1)
      throw InputError("slerp interpolates between the base and one other model; got " + std::to_string(n) + " besides the base");
    if (job.method == ModelMergeMethod::kSlerp && !std::isfinite(job.t)) throw InputError("slerp: t must be finite");
    if (job.method == ModelMergeMethod::kNuslerp && n != 2)
      throw InputError("nuslerp interpolates between two models; got " + std::to_string(n) + " besides the base");
    if (job.method == ModelMergeMethod::kNearswap && n != 1)
      throw InputError("nearswap moves the base towards one other model; got " + std::to_string(n) + " besides the base");
    if (job.method == ModelMergeMethod::kNearswap && !(std::isfinite(job.t) && job.t >= 0.0))
      throw InputError("nearswap: t must be a finite number >= 0, got " + format_number(job.t));
    if (job.method == ModelMergeMethod::kMultislerp && !(std::isfinite(job.eps) && job.eps >= 0.0))
      throw InputError("multislerp: eps must be a finite number >= 0, got " + format_number(job.eps));
    if (job.method == ModelMergeMethod::kModelStock && n < 2)
      throw InputError("model_stock needs at least two models besides the base (their deltas' angle sets the interpolation); got " +
                       std::to_string(n));
    for (std::size_t m = 0; m < n; ++m) {
      if (!std::isfinite(job.weights[m])) throw InputError(job.models[m] + ": weight must be finite");
      if (!(job.densities[m] >= 0.0 && job.densities[m] <= 1.0))
        throw InputError(job.models[m] + ": density must be in [0, 1], got " + std::to_string(job.densities[m]));
    }
    if (!std::isfinite(job.lambda)) throw InputError("lambda must be finite");
    if (job.order != MergeOrder::kNone && (linear || traits.combination != ModelMergeTraits::Combination::kDeltas))
      throw InputError(std::string("gradfix.order: ") + model_merge_method_name(job.method) +
                       " merges whole weights (or interpolates them), not sums of deltas from a base; masks go with task_arithmetic, "
                       "ties, dare_linear, dare_ties, breadcrumbs and breadcrumbs_ties");
    if (job.order != MergeOrder::kNone && job.signs.size() != n)
      throw InputError(std::string("gradfix.order ") + merge_order_name(job.order) + " needs sign statistics (gradfix: {signs: FILE}) "
                       "for every model: got " + std::to_string(job.signs.size()) + " for " + std::to_string(n) + " models");
    if (job.order == MergeOrder::kNone && !job.signs.empty())
      throw InputError("sign statistics given without gradfix.order (mask-then-merge or merge-then-mask)");
    base = open_reader(job.base.empty() ? job.models.front() : job.base);
    for (const auto& path : job.models) models.push_back(open_reader(path));
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
  if (sparsification == S::kRandom) options["seed"] = job.seed;
  if (sparsification == S::kOutliers) options["gammas"] = job.gammas;
  if (job.method == ModelMergeMethod::kSlerp || job.method == ModelMergeMethod::kNearswap) options["t"] = job.t;
  if (job.method == ModelMergeMethod::kMultislerp) options["eps"] = job.eps;
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

// This rank's chunks of each merged tensor, for the passes before the merge (DARE's norms, TIES's
// trims); a merged tensor split across ranks is listed even where this rank holds none of it, so
// that every rank joins its reductions.
using ChunksByTensor = std::map<std::size_t, std::vector<Piece>>;
ChunksByTensor merged_tensors_here(const ChunkedJob& chunked, const std::set<std::string>& merged) {
  ChunksByTensor tensors;
  const auto& layout = chunked.layout();
  for (const auto& chunk : chunked.chunks())
    if (merged.count(layout[chunk.tensor].name)) tensors[chunk.tensor].push_back(chunk);
  for (std::size_t t = 0; t < layout.size(); ++t)
    if (merged.count(layout[t].name) && chunked.plan().is_split(t)) tensors[t];
  return tensors;
}

// DARE keeps entry i of model m's delta when its draw falls below the model's density.
bool dare_keeps(const ModelMergeJob& job, std::size_t m, std::uint64_t key, long long index) {
  return job.densities[m] >= 1.0 || uniform_at(job.seed ^ mix_bits(m + 1), key, index, 0) < job.densities[m];
}

// mergekit's rescale (RescaleNorm.l1) of a sparsified delta: per tensor and model,
// ||delta||_1 / ||kept delta||_1, left at 1 when either norm is below 1e-7 or nothing was dropped
// (density 1). DARE rescales by default, TIES only with `rescale: true`. `sparsify(m, chunk,
// values)` zeroes what the method drops. The norms are exact sums, so the factor is the same at
// any number of ranks. `delta(m, chunk)` gives model m's delta there.
template <typename DeltaOf, typename Sparsify>
std::map<std::size_t, std::vector<double>> l1_rescales(const ModelMergeJob& job, const Ranks& ranks, const ChunkedJob& chunked,
                                                       const ChunksByTensor& tensors, const DeltaOf& delta, const Sparsify& sparsify) {
  std::map<std::size_t, std::vector<double>> rescales;  // by tensor
  const auto& plan = chunked.plan();
  for (const auto& entry : tensors) {
    // Plain names, not a structured binding: C++17 lambdas (clang) cannot capture those.
    const std::size_t t = entry.first;
    const std::vector<Piece>& mine = entry.second;
    for (std::size_t m = 0; m < job.models.size(); ++m) {
      double factor = 1.0;
      if (job.rescale && job.densities[m] < 1.0) {
        ExactSum before, after;
        for (const Piece& chunk : mine) {
          auto values = delta(m, chunk);
          for (const auto value : values) before.add(std::fabs(value));
          sparsify(m, chunk, values);
          for (const auto value : values) after.add(std::fabs(value));
        }
        auto total = [&](ExactSum& sum) { return plan.is_split(t) ? allreduce_exact_sum(ranks.context().stats(), sum) : sum.value(); };
        const double b = total(before), a = total(after);
        if (b >= 1e-7 && a >= 1e-7) factor = b / a;
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
std::map<std::size_t, std::vector<MagnitudeSparsification>> magnitude_sparsifications(const ModelMergeJob& job, const Ranks& ranks,
                                                                                     const ChunkedJob& chunked, const ChunksByTensor& tensors,
                                                                                     const DeltaOf& delta) {
  const bool breadcrumbs = model_merge_traits(job.method).sparsification == ModelMergeTraits::Sparsification::kOutliers;
  std::map<std::size_t, std::vector<MagnitudeSparsification>> out;  // by tensor
  for (const auto& [t, mine] : tensors) {
    const long long numel = chunked.layout()[t].numel();
    const bool split = chunked.plan().is_split(t);
    for (std::size_t m = 0; m < job.models.size(); ++m) {
      auto values = [&](const Piece& chunk) { return delta(m, chunk); };
      MagnitudeSparsification sparsification;
      if (!breadcrumbs) {
        sparsification.keep = exact_trim(ranks, mergekit_keep_count(numel, job.densities[m]), numel, split, mine, values);
      } else if (job.densities[m] < 1.0) {
        const auto target = static_cast<long long>(job.densities[m] * static_cast<double>(numel));
        const auto top = static_cast<long long>(job.gammas[m] * static_cast<double>(numel));
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
        allow_(job.output.allow_nonfinite) {
    for (double w : job.weights) weight_sum_ += w;
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
    chunked_.write(job_.out, metadata, job_.output, [&](const Piece& chunk, const TensorInfo& out, TensorWriter& writer, NonFiniteResults& nonfinite) {
      if (!in_.merged.count(out.name)) {
        copy_chunk(*in_.base, out, chunk, writer, true, nonfinite);
        return;
      }
      const std::vector<double> result = is(ModelMergeMethod::kLinear) ? linear_of(chunk) : merged_of(chunk);
      store(writer, out, chunk.begin, result.data(), chunk.count, nonfinite);
      elements += chunk.count;
    });
    return elements;
  }

 private:
  bool is(ModelMergeMethod method) const { return job_.method == method; }
  using Sparsification = ModelMergeTraits::Sparsification;
  bool dare() const { return traits_.sparsification == Sparsification::kRandom; }
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
      trims_ = magnitude_sparsifications(job_, ranks_, chunked_, tensors, delta_of);
      rescales_ = l1_rescales(job_, ranks_, chunked_, tensors, delta_of,
                              [&](std::size_t m, const Piece& chunk, std::vector<V>& values) { trims_.at(chunk.tensor)[m].apply(chunk, values); });
    }
    if (dare())
      rescales_ = l1_rescales(job_, ranks_, chunked_, tensors, delta_of, [&](std::size_t m, const Piece& chunk, std::vector<V>& values) {
        const std::uint64_t key = tensor_key_of(layout_[chunk.tensor].name);
        for (std::size_t i = 0; i < values.size(); ++i)
          if (!dare_keeps(job_, m, key, chunk.begin + static_cast<long long>(i))) values[i] = 0;
      });
  }

  // Model m's delta on a chunk, sparsified, rescaled and weighted.
  std::vector<double> weighted_delta(std::size_t m, const Piece& chunk, const std::vector<V>& base_values) const {
    auto values = delta(m, chunk, &base_values);
    if (trims()) trims_.at(chunk.tensor)[m].apply(chunk, values);
    std::vector<double> out(values.begin(), values.end());
    if (trims() || dare()) {
      const double factor = rescales_.at(chunk.tensor)[m];
      const std::uint64_t key = tensor_key_of(layout_[chunk.tensor].name);
      for (std::size_t i = 0; i < out.size(); ++i)
        out[i] = dare() && !dare_keeps(job_, m, key, chunk.begin + static_cast<long long>(i)) ? 0.0 : out[i] * factor;
    }
    for (auto& value : out) value *= job_.weights[m];
    return out;
  }

  // The merged delta of a chunk, before lambda.
  std::vector<double> mixed_of(const Piece& chunk) const {
    const auto count = static_cast<std::size_t>(chunk.count);
    const auto base_values = load_of(*in_.base, chunk);
    std::vector<std::vector<double>> deltas;
    for (std::size_t m = 0; m < models(); ++m) deltas.push_back(weighted_delta(m, chunk, base_values));
    std::vector<double> mixed(count, 0.0);
    if (consensus()) {
      std::vector<const double*> pointers;
      for (const auto& values : deltas) pointers.push_back(values.data());
      mergekit_consensus(pointers, job_.weights, job_.normalize, chunk.count, mixed.data());
      return mixed;
    }
    const double divisor = std::fabs(weight_sum_) < 1e-8 ? 1.0 : weight_sum_;
    for (std::size_t i = 0; i < count; ++i) {
      for (std::size_t m = 0; m < models(); ++m) mixed[i] += deltas[m][i];
      if (job_.normalize) mixed[i] /= divisor;
    }
    return mixed;
  }

  // Merge-then-mask: the merged delta is masked with sum_m sign(s_m), as gradfix merge does for
  // task vectors.
  std::vector<V> summed_signs(const Piece& chunk) const { return sign_sum<V>(in_.signs, layout_[chunk.tensor].name, chunk, allow_); }

  // base + lambda * the mixed delta (masked with merge-then-mask).
  std::vector<double> merged_of(const Piece& chunk) const {
    auto mixed = mixed_of(chunk);
    if (job_.order == MergeOrder::kMergeThenMask) {
      const std::vector<V> unmasked(mixed.begin(), mixed.end());
      std::vector<V> masked;
      mask_chunk(job_.mode, job_.mask, layout_[chunk.tensor], chunk, unmasked, summed_signs(chunk), merged_sums_, masked);
      mixed.assign(masked.begin(), masked.end());
    }
    const auto reference = load_of(*in_.base, chunk);
    std::vector<double> result(mixed.size());
    for (std::size_t i = 0; i < result.size(); ++i) result[i] = reference[i] + job_.lambda * mixed[i];
    return result;
  }

  // linear: sum_m w_m M_m, normalised by the weights.
  std::vector<double> linear_of(const Piece& chunk) const {
    std::vector<double> result(static_cast<std::size_t>(chunk.count), 0.0);
    for (std::size_t m = 0; m < models(); ++m) {
      const auto values = load_of(*in_.models[m], chunk);
      for (std::size_t i = 0; i < result.size(); ++i) result[i] += job_.weights[m] * values[i];
    }
    if (job_.normalize && weight_sum_ != 0.0)
      for (auto& value : result) value /= weight_sum_;
    return result;
  }

  const ModelMergeJob& job_;
  const ModelMergeTraits& traits_;
  const Ranks& ranks_;
  const ModelMergeInputs& in_;
  ChunkedJob& chunked_;
  const std::vector<TensorInfo>& layout_;
  const bool allow_;
  double weight_sum_ = 0.0;
  std::vector<Piece> merged_chunks_;  // this rank's chunks of the merged tensors (the others are copied from the base)
  std::vector<SumsByTensor> delta_sums_;  // mask-then-merge: each model's mask sums
  SumsByTensor merged_sums_;              // merge-then-mask
  std::map<std::size_t, std::vector<MagnitudeSparsification>> trims_;  // by tensor, per model
  std::map<std::size_t, std::vector<double>> rescales_;                 // by tensor, per model
};

// Writes every tensor: those not merged copied from the base, the merged ones chunk by chunk from
// `merged(chunk)`, rounded once to the output type.
template <typename Merged>
void write_merged(const ModelMergeJob& job, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata, long long& elements,
                  const Merged& merged) {
  chunked.write(job.out, metadata, job.output, [&](const Piece& chunk, const TensorInfo& out, TensorWriter& writer, NonFiniteResults& nonfinite) {
    if (!in.merged.count(out.name)) {
      copy_chunk(*in.base, out, chunk, writer, true, nonfinite);
      return;
    }
    const std::vector<double> result = merged(chunk);
    store(writer, out, chunk.begin, result.data(), chunk.count, nonfinite);
    elements += chunk.count;
  });
}

// A tensor's exact sum over its chunks, completed over the ranks when the tensor is split.
double tensor_total(const Ranks& ranks, const ChunkedJob& chunked, std::size_t tensor, ExactSum& sum) {
  return chunked.plan().is_split(tensor) ? allreduce_exact_sum(ranks.context().stats(), sum) : sum.value();
}

// The coefficients (c0, c1) of a spherical interpolation of v0 and v1 by t, from their squared
// norms and their dot product: mergekit's slerp (norms below `floor` count as 1, linear where
// |cos| > 0.9995) or nuslerp (norms clamped to 1e-7 below, linear where 1 - cos^2 <= 1e-16).
std::pair<double, double> spherical_coefficients(ModelMergeMethod method, double t, double s00, double s11, double s01) {
  const bool slerp = method == ModelMergeMethod::kSlerp;
  double n0 = std::sqrt(s00), n1 = std::sqrt(s11);
  if (slerp) {
    n0 = n0 > 1e-8 ? n0 : 1.0;
    n1 = n1 > 1e-8 ? n1 : 1.0;
  } else {
    n0 = std::max(n0, 1e-7);
    n1 = std::max(n1, 1e-7);
  }
  const double cosine = std::min(1.0, std::max(-1.0, s01 / (n0 * n1)));
  const bool linear = slerp ? std::fabs(cosine) > 0.9995 : 1.0 - cosine * cosine <= 1e-16;
  if (linear) return {1.0 - t, t};
  const double theta = std::acos(cosine), sine = std::sin(theta);
  return {std::sin((1.0 - t) * theta) / sine, std::sin(t * theta) / sine};
}

// slerp and nuslerp in the compute type V, each tensor as one vector: slerp rotates the base
// towards the model, nuslerp rotates between the two models, or their deltas from the base,
// which is then added back. A tensor's sums are exact and completed over the ranks when it is
// split, so the result does not depend on the number of ranks.
template <typename V>
void merge_spherical(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata,
                     long long& elements) {
  const bool slerp = job.method == ModelMergeMethod::kSlerp;
  const bool with_base = !job.base.empty() && !slerp;
  const auto& layout = chunked.layout();
  const bool allow = job.output.allow_nonfinite;
  const double t = slerp ? job.t : (std::fabs(job.weights[0] + job.weights[1]) < 1e-6 ? 0.5 : job.weights[1] / (job.weights[0] + job.weights[1]));
  // The two vectors of a chunk: slerp's base and model; nuslerp's models, less the base if any.
  auto pair_of = [&](const Piece& chunk, std::vector<V>& base_values) {
    const std::string& name = layout[chunk.tensor].name;
    std::pair<std::vector<V>, std::vector<V>> out;
    if (slerp) {
      out.first = load<V>(*in.base, name, chunk.begin, chunk.count, allow);
      out.second = load<V>(*in.models[0], name, chunk.begin, chunk.count, allow);
      return out;
    }
    out.first = load<V>(*in.models[0], name, chunk.begin, chunk.count, allow);
    out.second = load<V>(*in.models[1], name, chunk.begin, chunk.count, allow);
    if (with_base) {
      base_values = load<V>(*in.base, name, chunk.begin, chunk.count, allow);
      for (std::size_t i = 0; i < base_values.size(); ++i) {
        out.first[i] -= base_values[i];
        out.second[i] -= base_values[i];
      }
    }
    return out;
  };
  // Each tensor's coefficients from its exact sums.
  std::map<std::size_t, std::pair<double, double>> tensor_coefficients;
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    ExactSum s00, s11, s01;
    std::vector<V> unused;
    for (const Piece& chunk : entry.second) {
      const auto vectors = pair_of(chunk, unused);
      for (std::size_t i = 0; i < vectors.first.size(); ++i) {
        const double a = vectors.first[i], b = vectors.second[i];
        s00.add(a * a);
        s11.add(b * b);
        s01.add(a * b);
      }
    }
    const std::size_t tensor = entry.first;
    const double a = tensor_total(ranks, chunked, tensor, s00), b = tensor_total(ranks, chunked, tensor, s11),
                 c = tensor_total(ranks, chunked, tensor, s01);
    tensor_coefficients[tensor] = spherical_coefficients(job.method, t, a, b, c);
  }
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    std::vector<V> base_values;
    const auto vectors = pair_of(chunk, base_values);
    const auto count = static_cast<std::size_t>(chunk.count);
    const auto c = tensor_coefficients.at(chunk.tensor);
    std::vector<double> result(count);
    for (std::size_t i = 0; i < count; ++i) {
      result[i] = c.first * vectors.first[i] + c.second * vectors.second[i];
      if (with_base) result[i] += base_values[i];
    }
    return result;
  });
}

// NearSwap in the compute type V, entry by entry as mergekit computes it: w = clamp(t / max(|a -
// b|, 1e-6), 0, 1) and w b + (1 - w) a, with a the base and b the other model.
template <typename V>
void merge_nearswap(const ModelMergeJob& job, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata, long long& elements) {
  const bool allow = job.output.allow_nonfinite;
  const V t = static_cast<V>(job.t), floor = static_cast<V>(1e-6);
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    const std::string& name = chunked.layout()[chunk.tensor].name;
    const auto a = load<V>(*in.base, name, chunk.begin, chunk.count, allow);
    const auto b = load<V>(*in.models[0], name, chunk.begin, chunk.count, allow);
    std::vector<double> result(a.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      // t / x is PyTorch's reciprocal(x) * t for a scalar t: the same rounding here.
      const V reciprocal = V(1) / std::max(std::fabs(a[i] - b[i]), floor);
      const V weight = std::min(V(1), std::max(V(0), reciprocal * t));
      const V moved = weight * b[i] + (V(1) - weight) * a[i];
      result[i] = moved;
    }
    return result;
  });
}

// Model Stock's t from a tensor's deltas: the mean over pairs of their cosines (norm products
// floored at 1e-6, cosines clamped to [-1, 1]), t = k c / (1 + (k - 1) c), 0 where the
// denominator is within 1e-6 of 0 (no finite estimate: the base is kept).
double model_stock_t(const std::vector<double>& squared_norms, const std::vector<std::vector<double>>& dots) {
  const std::size_t k = squared_norms.size();
  double cosine = 0.0;
  std::size_t pairs = 0;
  for (std::size_t a = 0; a < k; ++a)
    for (std::size_t b = a + 1; b < k; ++b, ++pairs)
      cosine += std::min(1.0, std::max(-1.0, dots[a][b] / std::max(std::sqrt(squared_norms[a]) * std::sqrt(squared_norms[b]), 1e-6)));
  cosine /= static_cast<double>(pairs);
  const double denominator = 1.0 + static_cast<double>(k - 1) * cosine;
  return std::fabs(denominator) < 1e-6 ? 0.0 : static_cast<double>(k) * cosine / denominator;
}

// Model Stock in the compute type V, each tensor as one vector: t from the exact sums of its
// deltas' squared norms and pairwise dot products (completed over the ranks, so t does not
// depend on P), then t * mean(models) + (1 - t) * base entry by entry, the mean summed in model
// order and divided by k as mergekit does.
template <typename V>
void merge_model_stock(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata,
                       long long& elements) {
  const bool allow = job.output.allow_nonfinite;
  const std::size_t k = in.models.size();
  auto load_all = [&](const Piece& chunk, std::vector<V>& base, std::vector<std::vector<V>>& models) {
    const std::string& name = chunked.layout()[chunk.tensor].name;
    base = load<V>(*in.base, name, chunk.begin, chunk.count, allow);
    models.clear();
    for (const auto& reader : in.models) models.push_back(load<V>(*reader, name, chunk.begin, chunk.count, allow));
  };
  std::map<std::size_t, V> tensor_t;
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    std::vector<ExactSum> norms(k);
    std::vector<std::vector<ExactSum>> dots(k, std::vector<ExactSum>(k));
    std::vector<V> base;
    std::vector<std::vector<V>> models;
    for (const Piece& chunk : entry.second) {
      load_all(chunk, base, models);
      for (std::size_t i = 0; i < base.size(); ++i)
        for (std::size_t a = 0; a < k; ++a) {
          const double da = static_cast<V>(models[a][i] - base[i]);
          norms[a].add(da * da);
          for (std::size_t b = a + 1; b < k; ++b) dots[a][b].add(da * static_cast<V>(models[b][i] - base[i]));
        }
    }
    std::vector<double> norm_totals(k);
    std::vector<std::vector<double>> dot_totals(k, std::vector<double>(k, 0.0));
    for (std::size_t a = 0; a < k; ++a) {
      norm_totals[a] = tensor_total(ranks, chunked, entry.first, norms[a]);
      for (std::size_t b = a + 1; b < k; ++b) dot_totals[a][b] = tensor_total(ranks, chunked, entry.first, dots[a][b]);
    }
    tensor_t[entry.first] = static_cast<V>(model_stock_t(norm_totals, dot_totals));
  }
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    std::vector<V> base;
    std::vector<std::vector<V>> models;
    load_all(chunk, base, models);
    const V t = tensor_t.at(chunk.tensor);
    std::vector<double> result(base.size());
    for (std::size_t i = 0; i < base.size(); ++i) {
      V sum = models[0][i];
      for (std::size_t m = 1; m < k; ++m) sum += models[m][i];
      const V mean = sum / static_cast<V>(k);
      const V merged = t * mean + (V(1) - t) * base[i];
      result[i] = merged;
    }
    return result;
  });
}

// Multi-SLERP in double from the compute type V's values, each tensor as one vector, as mergekit
// computes it: with d_m the models' deltas from the base (or the models, without one), w_m the
// weights (divided by their sum with normalize_weights), n_m = |d_m| and u_m = d_m / (n_m + eps):
// the mean m = sum_m w_m u_m and m^ = m / |m|; the tangent vectors u_m - (u_m . m^) m^, averaged
// with the weights into g; the result (m^ cos|g| + g sin|g| / |g|) sum_m w_m n_m (+ the base),
// |g| taken with eps added. Where |m| < eps two models are mixed linearly (more are refused). One
// model is returned as it is. Three passes of exact sums per tensor (norms; |m| and u_m . m;
// |g|), completed over the ranks, so the result does not depend on P.
template <typename V>
void merge_multislerp(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata,
                      long long& elements) {
  const bool allow = job.output.allow_nonfinite, with_base = !job.base.empty();
  const std::size_t k = in.models.size();
  std::vector<double> w(job.weights);
  double weight_sum = 0.0;
  for (double value : w) weight_sum += value;
  if (job.normalize)
    for (double& value : w) value /= weight_sum;
  struct Tensor {
    std::vector<double> norms, dots;  // |d_m|; u_m . m^
    double mean_norm = 0.0, tangent_norm = 0.0;
    bool linear = false;  // |m| < eps: two models mixed linearly
  };
  std::map<std::size_t, Tensor> tensors;
  auto load_deltas = [&](const Piece& chunk, std::vector<V>& base) {
    const std::string& name = chunked.layout()[chunk.tensor].name;
    if (with_base) base = load<V>(*in.base, name, chunk.begin, chunk.count, allow);
    std::vector<std::vector<double>> deltas;
    for (const auto& reader : in.models) {
      const auto values = load<V>(*reader, name, chunk.begin, chunk.count, allow);
      deltas.emplace_back(values.size());
      for (std::size_t i = 0; i < values.size(); ++i) deltas.back()[i] = with_base ? static_cast<double>(static_cast<V>(values[i] - base[i])) : values[i];
    }
    return deltas;
  };
  // mean_i (before division by |m|) and, for `tangent`, g_i, from the deltas at entry i.
  auto mean_at = [&](const Tensor& t, const std::vector<std::vector<double>>& d, std::size_t i) {
    double mean = 0.0;
    for (std::size_t m = 0; m < k; ++m) mean += w[m] * d[m][i] / (t.norms[m] + job.eps);
    return mean;
  };
  auto tangent_at = [&](const Tensor& t, const std::vector<std::vector<double>>& d, std::size_t i, double unit_mean) {
    double tangent = 0.0;
    for (std::size_t m = 0; m < k; ++m) tangent += w[m] * (d[m][i] / (t.norms[m] + job.eps) - t.dots[m] * unit_mean);
    return tangent;
  };
  std::string refused;
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    if (k == 1) break;
    const std::size_t id = entry.first;
    Tensor& t = tensors[id];
    auto pass = [&](std::vector<ExactSum>& sums, const std::function<void(const std::vector<std::vector<double>>&, std::size_t)>& add) {
      std::vector<V> base;
      for (const Piece& chunk : entry.second) {
        const auto d = load_deltas(chunk, base);
        for (std::size_t i = 0; i < static_cast<std::size_t>(chunk.count); ++i) add(d, i);
      }
      std::vector<double> totals;
      for (auto& sum : sums) totals.push_back(tensor_total(ranks, chunked, id, sum));
      return totals;
    };
    std::vector<ExactSum> squares(k);
    t.norms = pass(squares, [&](const std::vector<std::vector<double>>& d, std::size_t i) {
      for (std::size_t m = 0; m < k; ++m) squares[m].add(d[m][i] * d[m][i]);
    });
    for (double& norm : t.norms) norm = std::sqrt(norm);
    std::vector<ExactSum> means(k + 1);  // u_m . m for each model, then |m|^2
    const std::vector<double> totals = pass(means, [&](const std::vector<std::vector<double>>& d, std::size_t i) {
      const double mean = mean_at(t, d, i);
      for (std::size_t m = 0; m < k; ++m) means[m].add(d[m][i] / (t.norms[m] + job.eps) * mean);
      means[k].add(mean * mean);
    });
    t.mean_norm = std::sqrt(totals[k]);
    if (t.mean_norm < job.eps) {
      t.linear = k == 2;
      if (k != 2 && refused.empty())
        refused = "multislerp: the weighted mean of the unit deltas of " + chunked.layout()[id].name +
                  " is zero (antipodal models with balancing weights); choose other weights";
      continue;
    }
    for (std::size_t m = 0; m < k; ++m) t.dots.push_back(totals[m] / t.mean_norm);
    std::vector<ExactSum> tangent(1);
    t.tangent_norm = std::sqrt(pass(tangent, [&](const std::vector<std::vector<double>>& d, std::size_t i) {
                                 const double g = tangent_at(t, d, i, mean_at(t, d, i) / t.mean_norm);
                                 tangent[0].add(g * g);
                               })[0]) + job.eps;
  }
  ranks.agree([&] {
    if (!refused.empty()) throw InputError(refused);
  });
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    std::vector<V> base;
    const auto d = load_deltas(chunk, base);
    std::vector<double> result(static_cast<std::size_t>(chunk.count));
    if (k == 1) {  // the one model as it is, base or not
      const auto values = load<V>(*in.models[0], chunked.layout()[chunk.tensor].name, chunk.begin, chunk.count, allow);
      return std::vector<double>(values.begin(), values.end());
    }
    const Tensor& t = tensors.at(chunk.tensor);
    double scale = 0.0;
    for (std::size_t m = 0; m < k; ++m) scale += t.norms[m] * w[m];
    for (std::size_t i = 0; i < result.size(); ++i) {
      if (t.linear) {
        result[i] = d[0][i] * w[0] + d[1][i] * w[1];
      } else {
        const double unit_mean = mean_at(t, d, i) / t.mean_norm;
        const double g = tangent_at(t, d, i, unit_mean);
        result[i] = (unit_mean * std::cos(t.tangent_norm) + g * (std::sin(t.tangent_norm) / t.tangent_norm)) * scale;
      }
      if (with_base) result[i] += base[i];
    }
    return result;
  });
}

}  // namespace

JobSummary run_model_merge(const ModelMergeJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  const ModelMergeInputs in = open_model_merge_inputs(job, ranks);
  std::vector<TensorInfo> layout;
  for (const auto& tensor : in.base->tensors()) layout.push_back(output_info(tensor, job.output));
  ChunkedJob chunked(ranks, "merge", layout);
  const Metadata metadata = model_merge_metadata(job, in);
  JobSummary summary;
  using C = ModelMergeTraits::Combination;
  const C combination = model_merge_traits(job.method).combination;
  const bool f64 = model_merge_in_f64(layout, in);
  if (combination == C::kSpherical && f64) merge_spherical<double>(job, ranks, in, chunked, metadata, summary.elements);
  else if (combination == C::kSpherical) merge_spherical<float>(job, ranks, in, chunked, metadata, summary.elements);
  else if (combination == C::kNearswap && f64) merge_nearswap<double>(job, in, chunked, metadata, summary.elements);
  else if (combination == C::kNearswap) merge_nearswap<float>(job, in, chunked, metadata, summary.elements);
  else if (combination == C::kModelStock && f64) merge_model_stock<double>(job, ranks, in, chunked, metadata, summary.elements);
  else if (combination == C::kModelStock) merge_model_stock<float>(job, ranks, in, chunked, metadata, summary.elements);
  else if (combination == C::kMultislerp && f64) merge_multislerp<double>(job, ranks, in, chunked, metadata, summary.elements);
  else if (combination == C::kMultislerp) merge_multislerp<float>(job, ranks, in, chunked, metadata, summary.elements);
  else if (f64) summary.elements = DeltaMerge<double>(job, ranks, in, chunked).run(metadata);
  else summary.elements = DeltaMerge<float>(job, ranks, in, chunked).run(metadata);
  chunked.commit(job.base.empty() ? job.models.front() : job.base);
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
