#pragma once
// Gradient-sign masks: given a task vector tau and a statistics tensor s that points along the
// descent direction of the target model (signs -1/0/+1, per-sample vote counts, or summed
// negative gradients), keep or reweight the entries of tau. The formulas are those of the
// official GradFix code (Rinaldi et al., ICLR 2026):
//   normal         tau where sign(tau) == sign(s), else 0 (s == 0 drops the entry)
//   force          |tau| * sign(s)
//   random         |tau| * r, r = +-1 from a seeded counter-based generator
//   soft1          tau * sigmoid(beta * tau * g / (||tau|| ||g|| + 1e-8)), norms over the tensor
//   soft2          tau * max(tanh(gamma * tau * g), 0)
//   soft3          tau * [sign(tau) == sign(g)] * |g| / (|g| + c)
//   soft*_rowwise  the same per row (first dimension) of a tensor of 2 or more dimensions:
//                  soft1 with the row cosine, soft2 with the row dot product, soft3 with the
//                  row's fraction of agreeing signs times mean|g| / (mean|g| + c);
//                  tensors of fewer dimensions use the element-wise form
//   oracle         normal, with the target's own task vector tau_B given as s
// g is sign(s), as the official code feeds signs, unless raw soft input is asked for.
//
// Rows are the unit of the reductions some modes need (a sum over a row, or over the whole
// tensor), so a mask is computed in two steps: accumulate_mask_sums over any chunk of the tensor,
// then apply_mask on each chunk with the completed sums. A rank that owns part of a tensor
// all-reduces the sums in between; a single process just calls both.

#include <cstdint>
#include <string>
#include <vector>

namespace gradfix {

enum class MaskMode { kNormal, kForce, kRandom, kSoft1, kSoft2, kSoft3, kSoft1Rowwise, kSoft2Rowwise, kSoft3Rowwise, kOracle };

// Throws InputError listing the valid names.
MaskMode parse_mask_mode(const std::string& name);
const char* mask_mode_name(MaskMode mode);
// "normal|force|random|..." for help texts and errors.
std::string mask_mode_names();

struct MaskOptions {
  double beta = 5.0;   // soft1 sharpness
  double gamma = 1.0;  // soft2 sharpness
  double c = 1.0;      // soft3 half-saturation constant
  std::uint64_t seed = 0;
  bool raw_soft_input = false;  // soft modes use s itself instead of sign(s)
  // InputError unless beta, gamma and c are finite and c > 0.
  void validate() const;
};

// How a mode reduces over a tensor of this shape.
struct MaskPlan {
  MaskMode mode = MaskMode::kNormal;
  long long row_length = 1;  // elements per reduction row (for soft1, a block of the tensor)
  int sums_per_row = 0;      // 0 for the purely element-wise modes
  long long rows = 0;
};

MaskPlan plan_mask(MaskMode mode, const std::vector<long long>& shape);

// T is float or double (F64 task vectors are masked in double; an F32 vector masked either way
// gives the same values: the weights are computed in double in both).

// Adds the partial sums of elements [begin, begin + count) to `sums`, which holds
// plan.sums_per_row doubles for every row of the tensor.
template <typename T>
void accumulate_mask_sums(const MaskPlan& plan, const MaskOptions& options, const T* tau, const T* s, long long begin,
                          long long count, double* sums);

// Writes the masked values of elements [begin, begin + count) to `out`. `tensor_key` seeds the
// random mode, so each tensor gets its own stream whatever the chunking.
template <typename T>
void apply_mask(const MaskPlan& plan, const MaskOptions& options, const T* tau, const T* s, long long begin, long long count,
                const double* sums, std::uint64_t tensor_key, T* out);

// The two steps over a whole tensor held in memory.
std::vector<float> mask_tensor(MaskMode mode, const MaskOptions& options, const std::vector<float>& tau,
                               const std::vector<float>& s, const std::vector<long long>& shape,
                               std::uint64_t tensor_key);

// The control of the paper's mask ablation: tau kept at `keep` of its non-zero entries chosen
// uniformly at random (from `seed` and `tensor_key`), zero elsewhere; as many entries as a
// gradient-sign mask kept, none of them chosen by the statistics. Throws std::invalid_argument
// when tau has fewer than `keep` non-zero entries.
std::vector<float> random_keep(const std::vector<float>& tau, long long keep, std::uint64_t seed, std::uint64_t tensor_key);

// A stable 64-bit key of a tensor name (FNV-1a), for tensor_key.
std::uint64_t tensor_key_of(const std::string& name);

}  // namespace gradfix
