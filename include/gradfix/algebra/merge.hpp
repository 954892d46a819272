#pragma once
// Merges of n task vectors, element by element:
//   mean  (1/n) sum_i tau_i
//   sum   sum_i tau_i
//   ties  TIES-merging (Yadav et al., 2023): trim each tau_i to its `fraction` largest
//         magnitudes, elect a sign per entry, average the kept entries that agree with it.
// The public TIES implementations differ in two choices, both selectable:
//   scope  tensor: the top fraction is taken within each tensor (official GradFix code,
//                  mergekit); global: over the whole task vector (the TIES paper's code)
//   elect  count: the sign with more non-zero votes, +1 on a tie (official GradFix code);
//          mass: the sign of the summed trimmed values (TIES paper, mergekit's default)
// The keep count is max(1, ceil(n * fraction)) and every entry whose magnitude reaches the k-th
// largest is kept, as the official GradFix code does. The mergekit variant follows mergekit's
// TIES instead: exactly k = max(1, int(n * fraction)) entries per tensor (ties at the threshold go
// to the earliest entries), the sign of the summed values elected (+ when the sum is 0).

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace gradfix {

enum class MergeMethod { kMean, kSum, kTies };
enum class TiesElect { kCount, kMass };
enum class TiesScope { kTensor, kGlobal };
enum class TiesVariant { kGradfix, kMergekit };
// How gradient-sign masks combine with a merge: none, each vector masked with its own
// statistics before the merge, or the merged vector masked with the sum of the sign tensors.
enum class MergeOrder { kNone, kMaskThenMerge, kMergeThenMask };

// Each throws InputError listing the valid names.
MergeMethod parse_merge_method(const std::string& name);
TiesElect parse_ties_elect(const std::string& name);
TiesScope parse_ties_scope(const std::string& name);
MergeOrder parse_merge_order(const std::string& name);
TiesVariant parse_ties_variant(const std::string& name);
const char* merge_method_name(MergeMethod method);
const char* merge_order_name(MergeOrder order);
const char* ties_elect_name(TiesElect elect);
const char* ties_scope_name(TiesScope scope);
const char* ties_variant_name(TiesVariant variant);

struct TiesOptions {
  double fraction = 0.2;
  TiesElect elect = TiesElect::kCount;
  TiesScope scope = TiesScope::kTensor;
  TiesVariant variant = TiesVariant::kGradfix;
};

// How many of n entries TIES keeps: 0 for fraction <= 0, n for fraction >= 1, otherwise
// max(1, ceil(n * fraction)).
long long ties_keep_count(long long n, double fraction);

// The k-th largest |value| (k >= 1) of values in memory; +inf for k == 0 (keep nothing), 0 for
// k > n (keep everything).
float kth_largest_magnitude(const float* values, long long n, long long k);

// The magnitude a TIES trim ranks an entry by: |value| as fp32. The thresholds are found among
// fp32 magnitudes (KthLargestMagnitude), so F64 vectors are ranked by their values rounded to fp32.
template <typename T>
inline float trim_magnitude(T value) {
  return std::fabs(static_cast<float>(value));
}

// Merges `count` elements of the vectors into `out`, T float or double (F64 task vectors). For
// ties, `thresholds[i]` is the magnitude at or above which entries of vector i survive the trim.
template <typename T>
void merge_values(MergeMethod method, TiesElect elect, const std::vector<const T*>& vectors, long long count,
                  const std::vector<float>& thresholds, T* out);

// mergekit's consensus over already trimmed and weighted deltas w_i * d_i at `count` entries: the
// elected sign is that of sum_i w_i d_i (+ when it is 0); out = the sum of the agreeing entries,
// divided by the sum of their weights when `normalize` (by 1 where that sum is 0).
void mergekit_consensus(const std::vector<const double*>& weighted, const std::vector<double>& weights, bool normalize,
                        long long count, double* out);

// mergekit's keep count: 0 for fraction <= 0, n for fraction >= 1, else max(1, int(n * fraction)).
long long mergekit_keep_count(long long n, double fraction);

// Exact k-th largest magnitude over values that arrive in chunks, in two passes over the data:
// a histogram of the upper 16 bits of |x|, then of the lower 16 bits within the chosen bucket.
// Histograms are plain counts, so ranks that each see part of the data can sum them (all-reduce)
// before next_pass().
class KthLargestMagnitude {
 public:
  explicit KthLargestMagnitude(long long k);
  // True while another pass over all values is needed.
  bool needs_pass() const { return pass_ < 2 && k_ > 0; }
  void add(const float* values, long long n);
  // This pass's counts so far (to be summed across ranks before next_pass).
  std::vector<long long>& histogram();
  // Closes the current pass.
  void next_pass();
  float threshold() const;

 private:
  long long k_;
  int pass_ = 0;
  unsigned bucket_ = 0;
  unsigned low_ = 0;
  long long above_ = 0;  // values strictly above the chosen bucket
  bool keep_all_ = false;
  std::vector<long long> histogram_;
  std::vector<std::uint32_t> lanes_;  // the first pass's counts not yet folded into histogram_
  long long pending_ = 0;             // values counted in lanes_
  long long counted_ = 0;             // values the first pass counted straight into histogram_
  void fold_lanes();
};

}  // namespace gradfix
