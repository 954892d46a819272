// gradfix merge --config, the methods that take each tensor as one vector: slerp and nuslerp
// (rotations), nearswap (entry by entry), model_stock and multislerp (by the deltas' angles), sce
// (by the deltas' variance and mean squares), karcher (the Riemannian mean of directions). A
// tensor's sums are exact and completed over the ranks when it is split, so the results do not
// depend on the number of ranks.
#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <stdexcept>

#include "gradfix/io/exact_sum.hpp"
#include "model_merge_internal.hpp"

namespace gradfix {
namespace file_jobs {
namespace {

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

// How nuslerp and model_stock cut a tensor into the vectors they take angles between: one
// vector, rows of `width` entries (a row is never split between chunks or ranks: the plan cuts
// on rows) or `width` columns, entry g in column g % width (a column runs through every chunk).
struct VectorCut {
  MergeVectors form = MergeVectors::kTensor;
  long long width = 1;

  VectorCut(MergeVectors wanted, const TensorInfo& tensor) {
    if (tensor.shape.size() < 2 || tensor.numel() == 0 || wanted == MergeVectors::kTensor) return;
    form = wanted;
    width = wanted == MergeVectors::kRows ? tensor.shape.back() : tensor.numel() / tensor.shape[0];
  }
  // The vectors whose sums are completed over every chunk of the tensor: one, or the columns.
  std::size_t tensor_vectors() const { return form == MergeVectors::kColumns ? static_cast<std::size_t>(width) : 1; }
  std::size_t column_of(long long entry) const { return form == MergeVectors::kColumns ? static_cast<std::size_t>(entry % width) : 0; }
  // Rows: the chunk's entries [begin, begin + count) as whole rows, else an internal error.
  void check_rows(const Piece& chunk, const std::string& name) const {
    if (form == MergeVectors::kRows && (chunk.begin % width != 0 || chunk.count % width != 0))
      throw std::logic_error("a chunk of " + name + " splits a row of " + std::to_string(width) + " entries");
  }
};

// slerp and nuslerp in the compute type V: slerp rotates the base towards the model, each tensor
// as one vector; nuslerp rotates between the two models, or their deltas from the base (added
// back), each tensor, row or column as one vector (job.vectors). The sums of a tensor or a
// column are exact and completed over the ranks when the tensor is split, a row's are its
// chunk's, so the result does not depend on the number of ranks.
template <typename V>
void merge_spherical(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata,
                     long long& elements) {
  const bool slerp = job.method == ModelMergeMethod::kSlerp;
  const bool with_base = !job.base.empty() && !slerp;
  const auto& layout = chunked.layout();
  const bool allow = job.output.allow_nonfinite;
  // t per tensor: slerp's own; nuslerp's from the two weights.
  auto t_of = [&](std::size_t tensor) {
    const MergeParameters& p = in.of(layout[tensor].name);
    return slerp ? p.t : (std::fabs(p.weights[0] + p.weights[1]) < 1e-6 ? 0.5 : p.weights[1] / (p.weights[0] + p.weights[1]));
  };
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
  // Adds entry i of a chunk's two vectors to the three sums at `sums` (s00, s11, s01).
  auto add_sums = [](const std::pair<std::vector<V>, std::vector<V>>& vectors, std::size_t i, ExactSum* sums) {
    const double a = vectors.first[i], b = vectors.second[i];
    sums[0].add(a * a);
    sums[1].add(b * b);
    sums[2].add(a * b);
  };
  // The three sums of entries [from, to) of a chunk's two vectors, in double, each over four
  // interleaved partial sums (one chain of dependent additions ran at a quarter of the rate),
  // combined in a fixed order: for a span never split between chunks or ranks (a row, a block of
  // a vector), the same at any P.
  auto span_sums = [](const std::pair<std::vector<V>, std::vector<V>>& vectors, std::size_t from, std::size_t to) {
    const V* a = vectors.first.data() + from;
    const V* b = vectors.second.data() + from;
    const std::size_t n = to - from;
    double aa[4] = {0.0, 0.0, 0.0, 0.0}, bb[4] = {0.0, 0.0, 0.0, 0.0}, ab[4] = {0.0, 0.0, 0.0, 0.0};
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4)
      for (std::size_t lane = 0; lane < 4; ++lane) {
        const double x = a[i + lane], y = b[i + lane];
        aa[lane] += x * x;
        bb[lane] += y * y;
        ab[lane] += x * y;
      }
    for (std::size_t lane = 0; i < n; ++i, ++lane) {
      const double x = a[i], y = b[i];
      aa[lane] += x * x;
      bb[lane] += y * y;
      ab[lane] += x * y;
    }
    auto total = [](const double* lanes) { return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]); };
    return std::array<double, 3>{total(aa), total(bb), total(ab)};
  };
  // Each tensor's (or each of its columns') coefficients from their exact sums; rows get theirs
  // chunk by chunk below.
  std::map<std::size_t, std::vector<std::pair<double, double>>> tensor_coefficients;
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    const std::size_t tensor = entry.first;
    const VectorCut cut(job.vectors, layout[tensor]);
    if (cut.form == MergeVectors::kRows) continue;
    std::vector<ExactSum> sums(3 * cut.tensor_vectors());
    std::vector<V> unused;
    // One vector: each split unit's sums (a row, or a block of a vector: never split between
    // chunks or ranks) in double, in order, then added exactly, which costs one exact addition
    // a row instead of one an entry and still gives the same bits at any P. Columns: entry by entry.
    const long long unit = split_unit(layout[tensor]);
    for (const Piece& chunk : entry.second) {
      const auto vectors = pair_of(chunk, unused);
      if (cut.form == MergeVectors::kColumns) {
        for (std::size_t i = 0; i < vectors.first.size(); ++i)
          add_sums(vectors, i, &sums[3 * cut.column_of(chunk.begin + static_cast<long long>(i))]);
        continue;
      }
      for (std::size_t from = 0, to = 0; from < vectors.first.size(); from = to) {
        // To the end of the unit `from` lies in, or of the chunk.
        const long long end = (chunk.begin + static_cast<long long>(from)) / unit * unit + unit;
        to = std::min(vectors.first.size(), static_cast<std::size_t>(end - chunk.begin));
        const auto partial = span_sums(vectors, from, to);
        for (std::size_t k = 0; k < 3; ++k) sums[k].add(partial[k]);
      }
    }
    const std::vector<double> totals = tensor_totals(ranks, chunked, tensor, sums);
    auto& coefficients = tensor_coefficients[tensor];
    for (std::size_t v = 0; v < cut.tensor_vectors(); ++v)
      coefficients.push_back(spherical_coefficients(job.method, t_of(tensor), totals[3 * v], totals[3 * v + 1], totals[3 * v + 2]));
  }
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    std::vector<V> base_values;
    const auto vectors = pair_of(chunk, base_values);
    const auto count = static_cast<std::size_t>(chunk.count);
    const VectorCut cut(job.vectors, layout[chunk.tensor]);
    cut.check_rows(chunk, layout[chunk.tensor].name);
    std::vector<std::pair<double, double>> row_coefficients;
    if (cut.form == MergeVectors::kRows) {
      const auto width = static_cast<std::size_t>(cut.width);
      // A row is never split: its sums in double, in order, are the same at any P.
      for (std::size_t row = 0; row < count / width; ++row) {
        const auto sums = span_sums(vectors, row * width, (row + 1) * width);
        row_coefficients.push_back(spherical_coefficients(job.method, t_of(chunk.tensor), sums[0], sums[1], sums[2]));
      }
    }
    const auto& coefficients = cut.form == MergeVectors::kRows ? row_coefficients : tensor_coefficients.at(chunk.tensor);
    std::vector<double> result(count);
    for (std::size_t i = 0; i < count; ++i) {
      const auto& c = cut.form == MergeVectors::kRows ? coefficients[i / static_cast<std::size_t>(cut.width)]
                                                      : coefficients[cut.column_of(chunk.begin + static_cast<long long>(i))];
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
  const V floor = static_cast<V>(1e-6);
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    const std::string& name = chunked.layout()[chunk.tensor].name;
    const V t = static_cast<V>(in.of(name).t);
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

// Model Stock in the compute type V: t from the exact sums of the deltas' squared norms and
// pairwise dot products, over each tensor as one vector (completed over the ranks, so t does not
// depend on P) or over each row (filter_wise), then t * mean(models) + (1 - t) * base entry by
// entry, the mean summed in model order and divided by k as mergekit does.
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
  // The sums of entries [from, to): k squared norms, then the k (k - 1) / 2 dot products a < b.
  const std::size_t pairs = k * (k - 1) / 2;
  auto add_sums = [&](const std::vector<V>& base, const std::vector<std::vector<V>>& models, std::size_t from, std::size_t to,
                      std::vector<ExactSum>& sums) {
    for (std::size_t i = from; i < to; ++i)
      for (std::size_t a = 0, pair = k; a < k; ++a) {
        const double da = static_cast<V>(models[a][i] - base[i]);
        sums[a].add(da * da);
        for (std::size_t b = a + 1; b < k; ++b, ++pair) sums[pair].add(da * static_cast<V>(models[b][i] - base[i]));
      }
  };
  auto t_from = [&](const std::vector<double>& totals) {
    std::vector<double> norms(totals.begin(), totals.begin() + static_cast<std::ptrdiff_t>(k));
    std::vector<std::vector<double>> dots(k, std::vector<double>(k, 0.0));
    for (std::size_t a = 0, pair = k; a < k; ++a)
      for (std::size_t b = a + 1; b < k; ++b, ++pair) dots[a][b] = totals[pair];
    return static_cast<V>(model_stock_t(norms, dots));
  };
  std::map<std::size_t, V> tensor_t;
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    if (VectorCut(job.vectors, chunked.layout()[entry.first]).form == MergeVectors::kRows) continue;
    std::vector<ExactSum> sums(k + pairs);
    std::vector<V> base;
    std::vector<std::vector<V>> models;
    for (const Piece& chunk : entry.second) {
      load_all(chunk, base, models);
      add_sums(base, models, 0, base.size(), sums);
    }
    tensor_t[entry.first] = t_from(tensor_totals(ranks, chunked, entry.first, sums));
  }
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    std::vector<V> base;
    std::vector<std::vector<V>> models;
    load_all(chunk, base, models);
    const VectorCut cut(job.vectors, chunked.layout()[chunk.tensor]);
    cut.check_rows(chunk, chunked.layout()[chunk.tensor].name);
    const auto width = cut.form == MergeVectors::kRows ? static_cast<std::size_t>(cut.width) : base.size();
    std::vector<double> result(base.size());
    for (std::size_t row = 0; row * width < base.size(); ++row) {
      V t;
      if (cut.form == MergeVectors::kRows) {
        std::vector<ExactSum> sums(k + pairs);
        add_sums(base, models, row * width, (row + 1) * width, sums);
        std::vector<double> totals;
        for (ExactSum& sum : sums) totals.push_back(sum.value());
        t = t_from(totals);
      } else {
        t = tensor_t.at(chunk.tensor);
      }
      for (std::size_t i = row * width; i < (row + 1) * width; ++i) {
        V sum = models[0][i];
        for (std::size_t m = 1; m < k; ++m) sum += models[m][i];
        const V mean = sum / static_cast<V>(k);
        const V merged = t * mean + (V(1) - t) * base[i];
        result[i] = merged;
      }
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
  struct Tensor {
    std::vector<double> w;            // the tensor's weights, divided by their sum with normalize_weights
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
    for (std::size_t m = 0; m < k; ++m) mean += t.w[m] * d[m][i] / (t.norms[m] + job.eps);
    return mean;
  };
  auto tangent_at = [&](const Tensor& t, const std::vector<std::vector<double>>& d, std::size_t i, double unit_mean) {
    double tangent = 0.0;
    for (std::size_t m = 0; m < k; ++m) tangent += t.w[m] * (d[m][i] / (t.norms[m] + job.eps) - t.dots[m] * unit_mean);
    return tangent;
  };
  std::string refused;
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    if (k == 1) break;
    const std::size_t id = entry.first;
    Tensor& t = tensors[id];
    t.w = in.of(chunked.layout()[id].name).weights;
    double weight_sum = 0.0;
    for (double value : t.w) weight_sum += value;
    if (job.normalize)
      for (double& value : t.w) value /= weight_sum;
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
    if (k == 1) {  // the one model as it is, base or not
      const auto values = load<V>(*in.models[0], chunked.layout()[chunk.tensor].name, chunk.begin, chunk.count, allow);
      return std::vector<double>(values.begin(), values.end());
    }
    std::vector<V> base;
    const auto d = load_deltas(chunk, base);
    std::vector<double> result(static_cast<std::size_t>(chunk.count));
    const Tensor& t = tensors.at(chunk.tensor);
    double scale = 0.0;
    for (std::size_t m = 0; m < k; ++m) scale += t.norms[m] * t.w[m];
    for (std::size_t i = 0; i < result.size(); ++i) {
      if (t.linear) {
        result[i] = d[0][i] * t.w[0] + d[1][i] * t.w[1];
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

// SCE in double from the compute type V's deltas tau_m = M_m - base, per tensor: with select_topk
// below 1, only the entries of the largest variance across the models (population variance) are
// kept, int(select_topk x the non-zero variances) of them, exactly (ties in index order); each
// delta's weight is its mean square over the tensor, divided by their sum (1 / k each where the
// sum is below 1e-6); per entry the sign of the deltas' sum is elected (+ at 0), and the result is
// base + sum_m w_m tau_m [sign agrees] / max(sum_m w_m [sign agrees], 1e-6).
template <typename V>
void merge_sce(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata,
               long long& elements) {
  const bool allow = job.output.allow_nonfinite;
  const std::size_t k = in.models.size();
  auto load_deltas = [&](const Piece& chunk, std::vector<V>& base) {
    const std::string& name = chunked.layout()[chunk.tensor].name;
    base = load<V>(*in.base, name, chunk.begin, chunk.count, allow);
    std::vector<std::vector<V>> deltas;
    for (const auto& reader : in.models) {
      deltas.push_back(load<V>(*reader, name, chunk.begin, chunk.count, allow));
      for (std::size_t i = 0; i < base.size(); ++i) deltas.back()[i] -= base[i];
    }
    return deltas;
  };
  // The variance across the models of each entry of a chunk, in V as mergekit's float32 result.
  auto variances = [&](const Piece& chunk) {
    std::vector<V> base;
    const auto d = load_deltas(chunk, base);
    std::vector<V> out(base.size());
    for (std::size_t i = 0; i < out.size(); ++i) {
      double mean = 0.0, square = 0.0;
      for (std::size_t m = 0; m < k; ++m) mean += d[m][i];
      mean /= static_cast<double>(k);
      for (std::size_t m = 0; m < k; ++m) square += (d[m][i] - mean) * (d[m][i] - mean);
      out[i] = static_cast<V>(square / static_cast<double>(k));
    }
    return out;
  };
  struct Tensor {
    Trim selection;  // keeps the selected entries' variances
    bool none = false;
    std::vector<double> weights;
  };
  std::map<std::size_t, Tensor> tensors;
  // The deltas of a chunk with the unselected entries zeroed.
  auto selected_deltas = [&](const Tensor& t, const Piece& chunk, std::vector<V>& base) {
    auto d = load_deltas(chunk, base);
    if (t.none) {
      for (auto& delta : d) std::fill(delta.begin(), delta.end(), V(0));
    } else if (!t.selection.keep_all) {
      auto kept = variances(chunk);
      t.selection.apply(chunk, kept);
      for (std::size_t i = 0; i < kept.size(); ++i)
        if (kept[i] == V(0))
          for (auto& delta : d) delta[i] = V(0);
    }
    return d;
  };
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    const std::size_t id = entry.first;
    const long long numel = chunked.layout()[id].numel();
    const bool split = chunked.plan().is_split(id);
    Tensor& t = tensors[id];
    if (job.select_topk <= 0.0) t.none = true;
    if (job.select_topk > 0.0 && job.select_topk < 1.0) {
      ExactSum nonzero;
      for (const Piece& chunk : entry.second)
        for (const V variance : variances(chunk)) nonzero.add(variance != V(0) ? 1.0 : 0.0);
      // mergekit: int(count_nonzero(var) * select_topk), the product in float32.
      const auto keep = static_cast<long long>(static_cast<float>(tensor_total(ranks, chunked, id, nonzero)) * static_cast<float>(job.select_topk));
      t.none = keep == 0;
      if (!t.none) t.selection = exact_trim(ranks, keep, numel, split, entry.second, variances);
    }
    std::vector<ExactSum> squares(k);
    std::vector<V> base;
    for (const Piece& chunk : entry.second) {
      const auto d = selected_deltas(t, chunk, base);
      for (std::size_t m = 0; m < k; ++m)
        for (const V value : d[m]) squares[m].add(static_cast<double>(value) * value);
    }
    double sum = 0.0;
    for (std::size_t m = 0; m < k; ++m) {
      t.weights.push_back(tensor_total(ranks, chunked, id, squares[m]) / static_cast<double>(numel));
      sum += t.weights.back();
    }
    for (double& weight : t.weights) weight = std::fabs(sum) < 1e-6 ? 1.0 / static_cast<double>(k) : weight / sum;
  }
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    const Tensor& t = tensors.at(chunk.tensor);
    std::vector<V> base;
    const auto d = selected_deltas(t, chunk, base);
    std::vector<double> result(base.size());
    for (std::size_t i = 0; i < result.size(); ++i) {
      double total = 0.0;
      for (std::size_t m = 0; m < k; ++m) total += d[m][i];
      const double elected = total >= 0.0 ? 1.0 : -1.0;
      double merged = 0.0, divisor = 0.0;
      for (std::size_t m = 0; m < k; ++m) {
        const double value = d[m][i], sign = value > 0.0 ? 1.0 : (value < 0.0 ? -1.0 : 0.0);
        if (sign != elected) continue;
        merged += value * t.weights[m];
        divisor += t.weights[m];
      }
      result[i] = base[i] + merged / std::max(divisor, 1e-6);
    }
    return result;
  });
}

// RAM and RAM+ (tensor-local), entry by entry in the compute type V with mergekit's operations
// in their order (so float32 merges give its bytes): d_m = M_m - base, counted where |d_m| >
// epsilon; c the count at the entry; each model's term is d_m lambda_m where it alone counts
// (c = 1), d_m / c where several do, 0 where it does not count; the terms summed in model order
// and added to the base. lambda_m is 1 for RAM; for RAM+ 1 + r clamp(shared_m / max(unique_m,
// epsilon), 0, alpha), with shared_m and unique_m the tensor's entries where model m counts
// together with others and alone: integer counts completed over the ranks, so the result does
// not depend on P.
template <typename V>
void merge_ram(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata,
               long long& elements) {
  const bool allow = job.output.allow_nonfinite, plus = job.method == ModelMergeMethod::kRamplusTl;
  const std::size_t k = in.models.size();
  const V epsilon = static_cast<V>(job.ram_epsilon);
  struct Entries {
    std::vector<V> base;
    std::vector<std::vector<V>> deltas;
    std::vector<int> counts;  // models counting at each entry
  };
  auto entries_of = [&](const Piece& chunk) {
    const std::string& name = chunked.layout()[chunk.tensor].name;
    Entries e;
    e.base = load<V>(*in.base, name, chunk.begin, chunk.count, allow);
    e.counts.assign(e.base.size(), 0);
    for (const auto& reader : in.models) {
      auto values = load<V>(*reader, name, chunk.begin, chunk.count, allow);
      for (std::size_t i = 0; i < values.size(); ++i) {
        values[i] -= e.base[i];
        e.counts[i] += std::fabs(values[i]) > epsilon ? 1 : 0;
      }
      e.deltas.push_back(std::move(values));
    }
    return e;
  };
  std::map<std::size_t, std::vector<V>> lambdas;  // RAM+: by tensor, per model
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    if (!plus) break;
    std::vector<ExactSum> shared(k), unique(k);
    for (const Piece& chunk : entry.second) {
      const Entries e = entries_of(chunk);
      for (std::size_t m = 0; m < k; ++m)
        for (std::size_t i = 0; i < e.counts.size(); ++i) {
          if (!(std::fabs(e.deltas[m][i]) > epsilon)) continue;
          (e.counts[i] > 1 ? shared[m] : unique[m]).add(1.0);
        }
    }
    for (std::size_t m = 0; m < k; ++m) {
      // mergekit: shared_counts / unique_counts.clamp(min=epsilon), the counts as float32.
      const auto s = static_cast<float>(tensor_total(ranks, chunked, entry.first, shared[m]));
      const auto u = static_cast<float>(tensor_total(ranks, chunked, entry.first, unique[m]));
      const float rho = s / std::max(u, static_cast<float>(job.ram_epsilon));
      const float boost = static_cast<float>(job.ram_r) * std::clamp(rho, 0.0f, static_cast<float>(job.ram_alpha));
      lambdas[entry.first].push_back(static_cast<V>(1.0f + boost));
    }
  }
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    const Entries e = entries_of(chunk);
    std::vector<double> result(e.base.size());
    for (std::size_t i = 0; i < result.size(); ++i) {
      const V count = static_cast<V>(std::max(e.counts[i], 1));
      V merged = 0;
      for (std::size_t m = 0; m < k; ++m) {
        const V value = std::fabs(e.deltas[m][i]) > epsilon ? e.deltas[m][i] : V(0);
        merged += e.counts[i] == 1 ? (plus ? value * lambdas.at(chunk.tensor)[m] : value) : value / count;
      }
      result[i] = static_cast<V>(e.base[i] + merged);
    }
    return result;
  });
}

// Arcee Fusion, a the base and b the one model: each entry's importance is |b - a| times the KL
// divergence sum_j p_j log(p_j / q_j) of its row (the last dimension; a vector is one row), p =
// softmax(b) + 1e-8 and q = softmax(a) + 1e-8; the tensor's threshold is median + 1.5 (q3 - q1)
// of the importances, each quantile the sorted value at floor(q (n - 1)); the result is a + (b -
// a) where the importance reaches the threshold, else a (in the compute type V). The divergence
// of two nearly equal rows is a small difference of larger terms, so it is computed in float64
// (mergekit's float32 value is off by about 1e-4 relative, which moves a few entries across the
// threshold); the importances are then rounded to float32 and their quantiles are exact order
// statistics over the whole tensor, counted across the ranks (mergekit samples a million entries
// at random from larger tensors). The rows that reach into a chunk are read whole.
template <typename V>
void merge_arcee_fusion(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata,
                        long long& elements) {
  const bool allow = job.output.allow_nonfinite;
  const auto& layout = chunked.layout();
  struct Rows {
    std::vector<V> a, b;            // the chunk's entries
    std::vector<float> importance;
  };
  auto rows_of = [&](const Piece& chunk) {
    const TensorInfo& info = layout[chunk.tensor];
    const long long width = info.shape.empty() ? 1 : std::max<long long>(1, info.shape.back());
    const long long first = chunk.begin / width * width, last = (chunk.begin + chunk.count + width - 1) / width * width;
    const auto a = load<V>(*in.base, info.name, first, last - first, allow), b = load<V>(*in.models[0], info.name, first, last - first, allow);
    Rows out;
    const auto offset = static_cast<long>(chunk.begin - first);
    out.a.assign(a.begin() + offset, a.begin() + offset + static_cast<long>(chunk.count));
    out.b.assign(b.begin() + offset, b.begin() + offset + static_cast<long>(chunk.count));
    out.importance.resize(static_cast<std::size_t>(chunk.count));
    std::vector<double> p(static_cast<std::size_t>(width)), q(static_cast<std::size_t>(width));
    auto softmax = [&](const V* x, std::vector<double>& values) {
      double largest = x[0];
      for (long long j = 1; j < width; ++j) largest = std::max(largest, static_cast<double>(x[j]));
      double sum = 0.0;
      for (long long j = 0; j < width; ++j) sum += (values[static_cast<std::size_t>(j)] = std::exp(static_cast<double>(x[j]) - largest));
      for (auto& value : values) value = value / sum + 1e-8;
    };
    for (long long row = first; row < last; row += width) {
      const auto at = static_cast<std::size_t>(row - first);
      softmax(b.data() + at, p);
      softmax(a.data() + at, q);
      double divergence = 0.0;
      for (std::size_t j = 0; j < p.size(); ++j) divergence += p[j] * std::log(p[j] / q[j]);
      for (long long j = 0; j < width; ++j) {
        const long long index = row + j;
        if (index < chunk.begin || index >= chunk.begin + chunk.count) continue;
        const auto i = static_cast<std::size_t>(index - chunk.begin);
        out.importance[i] = static_cast<float>(std::fabs(static_cast<double>(out.b[i]) - static_cast<double>(out.a[i])) * divergence);
      }
    }
    return out;
  };
  std::map<std::size_t, double> thresholds;
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    const long long numel = layout[entry.first].numel();
    const bool split = chunked.plan().is_split(entry.first);
    auto importances = [&](const Piece& chunk) { return rows_of(chunk).importance; };
    // The value at sorted position floor(q (n - 1)) is the (n - position)-th largest (the
    // importances are not negative: |b - a| times a divergence).
    auto quantile = [&](double q) {
      const auto position = static_cast<long long>(q * static_cast<double>(numel - 1));
      return static_cast<double>(distributed_threshold(ranks, numel - position, split, entry.second, importances));
    };
    const double median = quantile(0.5), q1 = quantile(0.25), q3 = quantile(0.75);
    thresholds[entry.first] = median + 1.5 * (q3 - q1);
  }
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    const Rows rows = rows_of(chunk);
    const double threshold = thresholds.at(chunk.tensor);
    std::vector<double> result(rows.a.size());
    for (std::size_t i = 0; i < result.size(); ++i)
      result[i] = static_cast<double>(rows.importance[i]) >= threshold ? static_cast<V>(rows.a[i] + (rows.b[i] - rows.a[i])) : rows.a[i];
    return result;
  });
}

// The Karcher mean's direction as coefficients over the models' unit vectors, from their Gram
// matrix G (u_a . u_b): mergekit iterates on whole tensors, but every iterate is a combination
// sum_m c_m u_m of the units, so dots and norms follow from G. `alphas` are the normalised
// weights of the models whose norm exceeds tol (`valid`); the result's coefficients are over all.
std::vector<double> karcher_coefficients(const std::vector<std::vector<double>>& gram, const std::vector<bool>& valid,
                                         const std::vector<double>& alphas, int max_iter, double tol) {
  const std::size_t k = gram.size();
  auto apply = [&](const std::vector<double>& c) {  // G c
    std::vector<double> out(k, 0.0);
    for (std::size_t a = 0; a < k; ++a)
      for (std::size_t b = 0; b < k; ++b) out[a] += gram[a][b] * c[b];
    return out;
  };
  auto norm = [&](const std::vector<double>& c) {
    const auto g = apply(c);
    double square = 0.0;
    for (std::size_t a = 0; a < k; ++a) square += c[a] * g[a];
    return std::sqrt(std::max(0.0, square));
  };
  std::vector<double> mean(alphas);
  const double mean_norm = norm(mean);
  if (mean_norm < tol) {  // the first valid unit
    std::fill(mean.begin(), mean.end(), 0.0);
    mean[static_cast<std::size_t>(std::find(valid.begin(), valid.end(), true) - valid.begin())] = 1.0;
  } else {
    for (double& c : mean) c /= mean_norm;
  }
  for (int iteration = 0; iteration < max_iter; ++iteration) {
    const auto dots = apply(mean);
    std::vector<double> tangent(k, 0.0);
    for (std::size_t m = 0; m < k; ++m) {
      if (!valid[m]) continue;
      const double dot = std::min(1.0, std::max(-1.0, dots[m])), theta = std::acos(dot);
      if (theta < tol) continue;
      const double step = alphas[m] * theta / std::sin(theta);
      tangent[m] += step;
      for (std::size_t a = 0; a < k; ++a) tangent[a] -= step * dot * mean[a];
    }
    const double tangent_norm = norm(tangent);
    if (tangent_norm < tol) break;
    for (std::size_t a = 0; a < k; ++a) mean[a] = std::cos(tangent_norm) * mean[a] + std::sin(tangent_norm) * tangent[a] / tangent_norm;
    const double unit_norm = norm(mean);
    if (unit_norm > tol)
      for (double& c : mean) c /= unit_norm;
  }
  return mean;
}

// The Karcher mean of the models' tensors (a base_model joins them first, as in mergekit), each
// tensor as one vector, weights 1 / k: with n_m the norms and u_m = t_m / n_m (0 where n_m is
// 0), the direction by karcher_coefficients, scaled by sum_m n_m / k. All tensors' norms at or
// below tol: zeros. One pass of exact sums per tensor (the Gram matrix), so the result does not
// depend on P. One model is returned as it is.
template <typename V>
void merge_karcher(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata,
                   long long& elements) {
  const bool allow = job.output.allow_nonfinite;
  std::vector<const TensorReader*> readers;  // mergekit takes a base_model as one more model, first
  if (!job.base.empty()) readers.push_back(in.base.get());
  for (const auto& reader : in.models) readers.push_back(reader.get());
  const std::size_t k = readers.size();
  auto load_models = [&](const Piece& chunk) {
    std::vector<std::vector<V>> values;
    for (const auto* reader : readers) values.push_back(load<V>(*reader, chunked.layout()[chunk.tensor].name, chunk.begin, chunk.count, allow));
    return values;
  };
  struct Tensor {
    std::vector<double> norms, coefficients;  // coefficients of the units, scale included
  };
  std::map<std::size_t, Tensor> tensors;
  for (const auto& entry : merged_tensors_here(chunked, in.merged)) {
    if (k == 1) break;
    const std::size_t id = entry.first;
    std::vector<std::vector<ExactSum>> sums(k, std::vector<ExactSum>(k));
    for (const Piece& chunk : entry.second) {
      const auto t = load_models(chunk);
      for (std::size_t i = 0; i < t[0].size(); ++i)
        for (std::size_t a = 0; a < k; ++a)
          for (std::size_t b = a; b < k; ++b) sums[a][b].add(static_cast<double>(t[a][i]) * t[b][i]);
    }
    std::vector<std::vector<double>> gram(k, std::vector<double>(k, 0.0));
    for (std::size_t a = 0; a < k; ++a)
      for (std::size_t b = a; b < k; ++b) gram[a][b] = gram[b][a] = tensor_total(ranks, chunked, id, sums[a][b]);
    Tensor& t = tensors[id];
    std::vector<bool> valid(k);
    double valid_sum = 0.0, scale = 0.0;
    for (std::size_t m = 0; m < k; ++m) {
      t.norms.push_back(std::sqrt(gram[m][m]));
      valid[m] = t.norms[m] > job.tol;
      valid_sum += valid[m] ? 1.0 / static_cast<double>(k) : 0.0;
      scale += t.norms[m] / static_cast<double>(k);
    }
    if (valid_sum == 0.0) {
      t.coefficients.assign(k, 0.0);
      continue;
    }
    for (std::size_t a = 0; a < k; ++a)  // the units' Gram matrix
      for (std::size_t b = 0; b < k; ++b)
        gram[a][b] = t.norms[a] > 0.0 && t.norms[b] > 0.0 ? gram[a][b] / (t.norms[a] * t.norms[b]) : 0.0;
    std::vector<double> alphas(k, 0.0);
    for (std::size_t m = 0; m < k; ++m) alphas[m] = valid[m] ? 1.0 / static_cast<double>(k) / valid_sum : 0.0;
    t.coefficients = karcher_coefficients(gram, valid, alphas, job.max_iter, job.tol);
    for (double& c : t.coefficients) c *= scale;
  }
  write_merged(job, in, chunked, metadata, elements, [&](const Piece& chunk) {
    const auto values = load_models(chunk);
    if (k == 1) return std::vector<double>(values[0].begin(), values[0].end());
    const Tensor& t = tensors.at(chunk.tensor);
    std::vector<double> result(values[0].size(), 0.0);
    for (std::size_t m = 0; m < k; ++m) {
      if (t.coefficients[m] == 0.0) continue;
      const double factor = t.coefficients[m] / t.norms[m];
      for (std::size_t i = 0; i < result.size(); ++i) result[i] += factor * values[m][i];
    }
    return result;
  });
}

}  // namespace

long long merge_whole_tensors(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked,
                              const Metadata& metadata, bool f64) {
  using C = ModelMergeTraits::Combination;
  long long elements = 0;
  switch (model_merge_traits(job.method).combination) {
    case C::kSpherical:
      if (f64) merge_spherical<double>(job, ranks, in, chunked, metadata, elements);
      else merge_spherical<float>(job, ranks, in, chunked, metadata, elements);
      break;
    case C::kNearswap:
      if (f64) merge_nearswap<double>(job, in, chunked, metadata, elements);
      else merge_nearswap<float>(job, in, chunked, metadata, elements);
      break;
    case C::kModelStock:
      if (f64) merge_model_stock<double>(job, ranks, in, chunked, metadata, elements);
      else merge_model_stock<float>(job, ranks, in, chunked, metadata, elements);
      break;
    case C::kMultislerp:
      if (f64) merge_multislerp<double>(job, ranks, in, chunked, metadata, elements);
      else merge_multislerp<float>(job, ranks, in, chunked, metadata, elements);
      break;
    case C::kSce:
      if (f64) merge_sce<double>(job, ranks, in, chunked, metadata, elements);
      else merge_sce<float>(job, ranks, in, chunked, metadata, elements);
      break;
    case C::kKarcher:
      if (f64) merge_karcher<double>(job, ranks, in, chunked, metadata, elements);
      else merge_karcher<float>(job, ranks, in, chunked, metadata, elements);
      break;
    case C::kArceeFusion:
      if (f64) merge_arcee_fusion<double>(job, ranks, in, chunked, metadata, elements);
      else merge_arcee_fusion<float>(job, ranks, in, chunked, metadata, elements);
      break;
    case C::kRam:
      if (f64) merge_ram<double>(job, ranks, in, chunked, metadata, elements);
      else merge_ram<float>(job, ranks, in, chunked, metadata, elements);
      break;
    case C::kDeltas: GRADFIX_CHECK(false, "a sum of deltas is not a whole-tensor merge");
  }
  return elements;
}

}  // namespace file_jobs
}  // namespace gradfix
