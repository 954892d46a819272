#include "gradfix/algebra/merge.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "gradfix/io/cpu_clones.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

template <typename Enum>
struct NamedValue {
  Enum value;
  const char* name;
};

constexpr NamedValue<MergeMethod> kMethods[] = {{MergeMethod::kMean, "mean"}, {MergeMethod::kSum, "sum"}, {MergeMethod::kTies, "ties"}};
constexpr NamedValue<TiesElect> kElects[] = {{TiesElect::kCount, "count"}, {TiesElect::kMass, "mass"}};
constexpr NamedValue<TiesScope> kScopes[] = {{TiesScope::kTensor, "tensor"}, {TiesScope::kGlobal, "global"}};
constexpr NamedValue<TiesVariant> kVariants[] = {{TiesVariant::kGradfix, "gradfix"}, {TiesVariant::kMergekit, "mergekit"}};
constexpr NamedValue<MergeOrder> kOrders[] = {
    {MergeOrder::kNone, "none"}, {MergeOrder::kMaskThenMerge, "mask-then-merge"}, {MergeOrder::kMergeThenMask, "merge-then-mask"}};

template <typename Enum, std::size_t N>
Enum parse_named(const NamedValue<Enum> (&table)[N], const std::string& name, const char* what) {
  std::string valid;
  for (const auto& entry : table) {
    if (name == entry.name) return entry.value;
    valid += (valid.empty() ? "" : "|") + std::string(entry.name);
  }
  throw InputError(std::string("unknown ") + what + " '" + name + "'; valid: " + valid);
}

template <typename Enum, std::size_t N>
const char* name_of(const NamedValue<Enum> (&table)[N], Enum value) {
  for (const auto& entry : table)
    if (entry.value == value) return entry.name;
  return "?";
}

}  // namespace

MergeMethod parse_merge_method(const std::string& name) { return parse_named(kMethods, name, "merge method"); }
TiesElect parse_ties_elect(const std::string& name) { return parse_named(kElects, name, "TIES election"); }
TiesScope parse_ties_scope(const std::string& name) { return parse_named(kScopes, name, "TIES scope"); }
MergeOrder parse_merge_order(const std::string& name) { return parse_named(kOrders, name, "merge order"); }
TiesVariant parse_ties_variant(const std::string& name) { return parse_named(kVariants, name, "TIES variant"); }
const char* ties_variant_name(TiesVariant variant) { return name_of(kVariants, variant); }
const char* merge_method_name(MergeMethod method) { return name_of(kMethods, method); }
const char* merge_order_name(MergeOrder order) { return name_of(kOrders, order); }
const char* ties_elect_name(TiesElect elect) { return name_of(kElects, elect); }
const char* ties_scope_name(TiesScope scope) { return name_of(kScopes, scope); }

template <typename T>
void merge_values(MergeMethod method, TiesElect elect, const std::vector<const T*>& vectors, long long count,
                  const std::vector<float>& thresholds, T* out) {
  const std::size_t n = vectors.size();
  if (method != MergeMethod::kTies) {
    const double scale = method == MergeMethod::kMean && n > 0 ? 1.0 / static_cast<double>(n) : 1.0;
    for (long long i = 0; i < count; ++i) {
      double total = 0.0;
      for (const T* vector : vectors) total += static_cast<double>(vector[i]);
      out[i] = static_cast<T>(total * scale);
    }
    return;
  }
  // Whether an entry survives the trim: its magnitude (as fp32, the precision the thresholds are
  // found in) reaches the vector's threshold.
  auto survives = [&](T value, std::size_t v) { return value != T(0) && !(trim_magnitude(value) < thresholds[v]); };
  for (long long i = 0; i < count; ++i) {
    // Trim, then elect: positive and negative votes (count) or summed values (mass).
    int positive = 0, negative = 0;
    double mass = 0.0;
    for (std::size_t v = 0; v < n; ++v) {
      const T value = vectors[v][i];
      if (!survives(value, v)) continue;
      positive += value > T(0);
      negative += value < T(0);
      mass += static_cast<double>(value);
    }
    int elected = 0;
    if (elect == TiesElect::kCount) {
      if (positive + negative > 0) elected = positive >= negative ? 1 : -1;
    } else {
      elected = mass > 0.0 ? 1 : (mass < 0.0 ? -1 : 0);
    }
    // Disjoint mean: the average of the surviving entries that agree with the elected sign.
    double total = 0.0;
    int agreeing = 0;
    for (std::size_t v = 0; v < n; ++v) {
      const T value = vectors[v][i];
      if (!survives(value, v)) continue;
      if ((value > T(0) ? 1 : -1) != elected) continue;
      total += static_cast<double>(value);
      ++agreeing;
    }
    out[i] = agreeing > 0 ? static_cast<T>(total / agreeing) : T(0);
  }
}

template void merge_values<float>(MergeMethod, TiesElect, const std::vector<const float*>&, long long, const std::vector<float>&,
                                  float*);
template void merge_values<double>(MergeMethod, TiesElect, const std::vector<const double*>&, long long, const std::vector<float>&,
                                   double*);

GRADFIX_AVX2_CLONE void mergekit_consensus(const std::vector<const double*>& weighted, const std::vector<double>& weights, bool normalize,
                        long long count, double* out) {
  // In blocks that stay in the first-level cache, model by model within a block, so that each
  // loop is a vector operation and nothing is allocated; each entry's sums still run over the
  // models in order, as one loop per entry would add them.
  constexpr std::size_t kBlock = 512;
  alignas(64) double sign[kBlock], mixed[kBlock], divisor[kBlock];
  const auto n = static_cast<std::size_t>(count);
  for (std::size_t first = 0; first < n; first += kBlock) {
    const std::size_t size = std::min(kBlock, n - first);
    for (std::size_t i = 0; i < size; ++i) sign[i] = mixed[i] = divisor[i] = 0.0;
    for (const double* delta : weighted) {
      const double* __restrict block = delta + first;
#pragma omp simd
      for (std::size_t i = 0; i < size; ++i) sign[i] += block[i];
    }
    // The elected sign: + where the sum is >= 0 (as a factor, so that the loops below have no branch).
#pragma omp simd
    for (std::size_t i = 0; i < size; ++i) sign[i] = sign[i] >= 0.0 ? 1.0 : -1.0;
    for (std::size_t m = 0; m < weighted.size(); ++m) {
      const double* __restrict block = weighted[m] + first;
      const double weight = weights[m];
#pragma omp simd
      for (std::size_t i = 0; i < size; ++i) {
        // A delta agrees when its sign is the elected one; a zero (or NaN) delta agrees with neither.
        const bool agrees = block[i] * sign[i] > 0.0;
        mixed[i] += agrees ? block[i] : 0.0;
        divisor[i] += agrees ? weight : 0.0;
      }
    }
    double* __restrict target = out + first;
#pragma omp simd
    for (std::size_t i = 0; i < size; ++i) {
      const double by = divisor[i] == 0.0 ? 1.0 : divisor[i];
      target[i] = normalize ? mixed[i] / by : mixed[i];
    }
  }
}

long long mergekit_keep_count(long long n, double fraction) {
  if (fraction >= 1.0) return n;
  if (fraction <= 0.0 || n == 0) return 0;
  return std::max(1LL, static_cast<long long>(fraction * static_cast<double>(n)));
}

}  // namespace gradfix
