#include "gradfix/algebra/mask.hpp"

#include <cmath>
#include <stdexcept>
#include <utility>

#include "gradfix/io/error.hpp"
#include "gradfix/io/splitmix.hpp"

namespace gradfix {
namespace {

struct ModeName {
  MaskMode mode;
  const char* name;
};

constexpr ModeName kModeNames[] = {
    {MaskMode::kNormal, "normal"},          {MaskMode::kForce, "force"},
    {MaskMode::kRandom, "random"},          {MaskMode::kSoft1, "soft1"},
    {MaskMode::kSoft2, "soft2"},            {MaskMode::kSoft3, "soft3"},
    {MaskMode::kSoft1Rowwise, "soft1_rowwise"}, {MaskMode::kSoft2Rowwise, "soft2_rowwise"},
    {MaskMode::kSoft3Rowwise, "soft3_rowwise"}, {MaskMode::kOracle, "oracle"},
};

template <typename T>
inline T sign_of(T value) { return value > T(0) ? T(1) : (value < T(0) ? T(-1) : T(0)); }

// Block length of soft1's partial sums on vectors and scalars.
constexpr long long kSoft1Block = 4096;

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

bool is_soft(MaskMode mode) {
  return mode == MaskMode::kSoft1 || mode == MaskMode::kSoft2 || mode == MaskMode::kSoft3 ||
         mode == MaskMode::kSoft1Rowwise || mode == MaskMode::kSoft2Rowwise || mode == MaskMode::kSoft3Rowwise;
}

}  // namespace

void MaskOptions::validate() const {
  for (const auto& [value, option] : {std::pair<double, const char*>{beta, "--beta"}, {gamma, "--gamma"}, {c, "--soft-c"}})
    if (!std::isfinite(value)) throw InputError(std::string(option) + " must be finite");
  // soft3 divides by |g| + c: a c of zero or below divides by zero where |g| = c's negative.
  if (!(c > 0.0)) throw InputError("--soft-c must be positive, got " + std::to_string(c));
}

MaskMode parse_mask_mode(const std::string& name) {
  for (const auto& entry : kModeNames)
    if (name == entry.name) return entry.mode;
  throw InputError("unknown mask mode '" + name + "'; valid modes: " + mask_mode_names());
}

const char* mask_mode_name(MaskMode mode) {
  for (const auto& entry : kModeNames)
    if (entry.mode == mode) return entry.name;
  return "?";
}

std::string mask_mode_names() {
  std::string names;
  for (const auto& entry : kModeNames) names += (names.empty() ? "" : "|") + std::string(entry.name);
  return names;
}

std::uint64_t tensor_key_of(const std::string& name) {
  std::uint64_t hash = 0xCBF29CE484222325ULL;
  for (unsigned char c : name) {
    hash ^= c;
    hash *= 0x100000001B3ULL;
  }
  return hash;
}

MaskPlan plan_mask(MaskMode mode, const std::vector<long long>& shape) {
  long long numel = 1;
  for (long long dim : shape) numel *= dim;
  MaskPlan plan;
  plan.mode = mode;
  const bool rowwise = shape.size() >= 2 && numel > 0;
  // A rowwise mode on a vector or scalar falls back to its element-wise form, as the official
  // code does.
  if (!rowwise) {
    if (mode == MaskMode::kSoft1Rowwise) plan.mode = MaskMode::kSoft1;
    if (mode == MaskMode::kSoft2Rowwise) plan.mode = MaskMode::kSoft2;
    if (mode == MaskMode::kSoft3Rowwise) plan.mode = MaskMode::kSoft3;
  }
  switch (plan.mode) {
    case MaskMode::kSoft1:
      // Sums of t^2 and g^2 per block (a row of a matrix, or kSoft1Block elements of a vector),
      // folded in block order by apply_mask.
      plan.row_length = shape.size() >= 2 && numel > 0 ? numel / shape[0] : kSoft1Block;
      plan.sums_per_row = 2;
      break;
    case MaskMode::kSoft1Rowwise:
    case MaskMode::kSoft2Rowwise:
    case MaskMode::kSoft3Rowwise:
      plan.row_length = numel / shape[0];
      plan.sums_per_row = 3;  // soft1: t.g, t.t, g.g; soft2: t.g; soft3: agreeing signs, sum |g|
      break;
    default:
      plan.row_length = 1;
      plan.sums_per_row = 0;
      break;
  }
  plan.rows = plan.sums_per_row > 0 ? (numel + plan.row_length - 1) / plan.row_length : 0;
  return plan;
}

template <typename T>
void accumulate_mask_sums(const MaskPlan& plan, const MaskOptions& options, const T* tau, const T* s, long long begin,
                          long long count, double* sums) {
  if (plan.sums_per_row == 0) return;
  const bool raw = options.raw_soft_input;
  for (long long i = 0; i < count; ++i) {
    const double t = tau[i];
    const double g = raw ? static_cast<double>(s[i]) : static_cast<double>(sign_of(s[i]));
    double* row = sums + ((begin + i) / plan.row_length) * plan.sums_per_row;
    switch (plan.mode) {
      case MaskMode::kSoft1:
        row[0] += t * t;
        row[1] += g * g;
        break;
      case MaskMode::kSoft1Rowwise:
        row[0] += t * g;
        row[1] += t * t;
        row[2] += g * g;
        break;
      case MaskMode::kSoft2Rowwise: row[0] += t * g; break;
      case MaskMode::kSoft3Rowwise:
        row[0] += sign_of(t) == sign_of(g) ? 1.0 : 0.0;
        row[1] += std::fabs(g);
        break;
      default: break;
    }
  }
}

namespace {

// Runs `weight_of(i, t, g, row)` over the chunk with the mode fixed outside the loop, so that the
// element-wise modes compile to straight vector code.
template <typename T, typename Weight>
void apply_weights(const MaskPlan& plan, bool raw, const T* tau, const T* s, long long begin, long long count,
                   const double* sums, T* out, Weight weight_of) {
  for (long long i = 0; i < count; ++i) {
    const T g = raw ? s[i] : sign_of(s[i]);
    const double* row = plan.sums_per_row > 0 ? sums + ((begin + i) / plan.row_length) * plan.sums_per_row : nullptr;
    out[i] = static_cast<T>(weight_of(static_cast<double>(tau[i]), static_cast<double>(g), row) * static_cast<double>(tau[i]));
  }
}

}  // namespace

template <typename T>
void apply_mask(const MaskPlan& plan, const MaskOptions& options, const T* tau, const T* s, long long begin, long long count,
                const double* sums, std::uint64_t tensor_key, T* out) {
  const bool raw = options.raw_soft_input && is_soft(plan.mode);
  switch (plan.mode) {
    case MaskMode::kNormal:
    case MaskMode::kOracle:
      for (long long i = 0; i < count; ++i) out[i] = sign_of(tau[i]) == sign_of(s[i]) ? tau[i] : T(0);
      return;
    case MaskMode::kForce:
      for (long long i = 0; i < count; ++i) out[i] = std::fabs(tau[i]) * sign_of(s[i]);
      return;
    case MaskMode::kRandom:
      for (long long i = 0; i < count; ++i) {
        // splitmix64 as a counter-based generator: element i's sign depends only on (seed, tensor,
        // i), not on how the tensor was split into chunks or across ranks.
        const std::uint64_t bits = splitmix64(options.seed ^ splitmix64(tensor_key ^ splitmix64(static_cast<std::uint64_t>(begin + i))));
        out[i] = (bits >> 63) != 0 ? -std::fabs(tau[i]) : std::fabs(tau[i]);
      }
      return;
    case MaskMode::kSoft1: {
      // The whole-tensor norms are the fold of the per-block sums, in block order, so the result
      // does not depend on how the tensor was split.
      double tt = 0.0, gg = 0.0;
      for (long long r = 0; r < plan.rows; ++r) {
        tt += sums[2 * r];
        gg += sums[2 * r + 1];
      }
      const double denominator = std::sqrt(tt) * std::sqrt(gg) + 1e-8;
      apply_weights(plan, raw, tau, s, begin, count, nullptr, out,
                    [&](double t, double g, const double*) { return sigmoid(options.beta * (t * g / denominator)); });
      return;
    }
    case MaskMode::kSoft2:
      apply_weights(plan, raw, tau, s, begin, count, sums, out,
                    [&](double t, double g, const double*) { return std::max(std::tanh(options.gamma * t * g), 0.0); });
      return;
    case MaskMode::kSoft3:
      apply_weights(plan, raw, tau, s, begin, count, sums, out, [&](double t, double g, const double*) {
        const double magnitude = std::fabs(g);
        return sign_of(t) == sign_of(g) ? magnitude / (magnitude + options.c) : 0.0;
      });
      return;
    case MaskMode::kSoft1Rowwise:
      apply_weights(plan, raw, tau, s, begin, count, sums, out, [&](double, double, const double* row) {
        return sigmoid(options.beta * row[0] / (std::sqrt(row[1]) * std::sqrt(row[2]) + 1e-8));
      });
      return;
    case MaskMode::kSoft2Rowwise:
      apply_weights(plan, raw, tau, s, begin, count, sums, out,
                    [&](double, double, const double* row) { return std::max(std::tanh(options.gamma * row[0]), 0.0); });
      return;
    case MaskMode::kSoft3Rowwise: {
      const double n = static_cast<double>(plan.row_length);
      apply_weights(plan, raw, tau, s, begin, count, sums, out, [&](double, double, const double* row) {
        const double mean_magnitude = row[1] / n;
        return (row[0] / n) * mean_magnitude / (mean_magnitude + options.c);
      });
      return;
    }
  }
}

template void accumulate_mask_sums<float>(const MaskPlan&, const MaskOptions&, const float*, const float*, long long, long long,
                                          double*);
template void accumulate_mask_sums<double>(const MaskPlan&, const MaskOptions&, const double*, const double*, long long, long long,
                                           double*);
template void apply_mask<float>(const MaskPlan&, const MaskOptions&, const float*, const float*, long long, long long, const double*,
                                std::uint64_t, float*);
template void apply_mask<double>(const MaskPlan&, const MaskOptions&, const double*, const double*, long long, long long,
                                 const double*, std::uint64_t, double*);

std::vector<float> mask_tensor(MaskMode mode, const MaskOptions& options, const std::vector<float>& tau,
                               const std::vector<float>& s, const std::vector<long long>& shape,
                               std::uint64_t tensor_key) {
  const MaskPlan plan = plan_mask(mode, shape);
  const auto count = static_cast<long long>(tau.size());
  std::vector<double> sums(static_cast<std::size_t>(plan.rows * plan.sums_per_row), 0.0);
  accumulate_mask_sums(plan, options, tau.data(), s.data(), 0, count, sums.data());
  std::vector<float> out(tau.size());
  apply_mask(plan, options, tau.data(), s.data(), 0, count, sums.data(), tensor_key, out.data());
  return out;
}

std::vector<float> random_keep(const std::vector<float>& tau, long long keep, std::uint64_t seed, std::uint64_t tensor_key) {
  std::vector<std::size_t> nonzero;
  for (std::size_t i = 0; i < tau.size(); ++i)
    if (tau[i] != 0.0f) nonzero.push_back(i);
  if (keep < 0 || static_cast<std::size_t>(keep) > nonzero.size())
    throw std::invalid_argument("random_keep: " + std::to_string(keep) + " entries asked of a vector with " + std::to_string(nonzero.size()) +
                                " non-zero entries");
  // The first `keep` steps of a Fisher-Yates shuffle, each swap drawn from the counter-based
  // generator: the choice depends only on (seed, tensor, keep), on every platform.
  std::vector<float> out(tau.size(), 0.0f);
  const std::uint64_t stream = splitmix64(seed ^ splitmix64(tensor_key));
  for (std::size_t i = 0; i < static_cast<std::size_t>(keep); ++i) {
    const std::size_t j = i + static_cast<std::size_t>(splitmix64(stream ^ splitmix64(i)) % (nonzero.size() - i));
    std::swap(nonzero[i], nonzero[j]);
    out[nonzero[i]] = tau[nonzero[i]];
  }
  return out;
}

}  // namespace gradfix
