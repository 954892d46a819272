#include "gradfix/io/exact_sum.hpp"

#include <cmath>

#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {
constexpr int kOffset = 1152;  // bit 0 of limb 0 is 2^-kOffset: below the smallest double, 2^-1074
}

void ExactSum::add(double value) {
  GRADFIX_CHECK(std::isfinite(value), "ExactSum::add of a value that is not finite");
  if (value == 0.0) return;
  int exponent = 0;
  // value = mantissa * 2^(exponent - 53), mantissa an integer below 2^53.
  const double fraction = std::frexp(value, &exponent);
  const auto mantissa = static_cast<std::int64_t>(std::ldexp(fraction, 53));
  const int position = exponent - 53 + kOffset;  // >= -1073 - 53 + 1152 > 0 for every double
  const bool negative = mantissa < 0;
  // The magnitude split in 32-bit halves, each shifted into place (below 2^64 each).
  const auto magnitude = static_cast<std::uint64_t>(negative ? -mantissa : mantissa);
  const int shift = position % 32;
  const std::uint64_t low = (magnitude & 0xffffffffULL) << shift, high = (magnitude >> 32) << shift;
  const std::int64_t parts[3] = {static_cast<std::int64_t>(low & 0xffffffffULL),
                                 static_cast<std::int64_t>((low >> 32) + (high & 0xffffffffULL)), static_cast<std::int64_t>(high >> 32)};
  const auto first = static_cast<std::size_t>(position / 32);
  for (std::size_t k = 0; k < 3; ++k) limbs_[first + k] += negative ? -parts[k] : parts[k];
  // Each limb moves by less than 2^33 per addition: carry well before an int64 could overflow.
  if (++pending_ >= (1LL << 28)) carry();
}

void ExactSum::carry() {
  for (int i = 0; i + 1 < kLimbs; ++i) {
    // Floor division by 2^32, so that each limb ends in 0 .. 2^32 - 1.
    const std::int64_t carry = limbs_[static_cast<std::size_t>(i)] >> 32;
    limbs_[static_cast<std::size_t>(i)] -= carry * (1LL << 32);
    limbs_[static_cast<std::size_t>(i + 1)] += carry;
  }
  pending_ = 0;
}

const std::array<std::int64_t, ExactSum::kLimbs>& ExactSum::carried() {
  carry();
  return limbs_;
}

double ExactSum::value() const {
  ExactSum copy = *this;
  copy.carry();
  // The top limb carries the sign: a negative total reads as its negation's limbs, negated.
  const bool negative = copy.limbs_[kLimbs - 1] < 0;
  if (negative) {
    for (auto& limb : copy.limbs_) limb = -limb;
    copy.carry();
  }
  // From the most significant limb down, in double: within an ulp or so of the exact sum, and
  // the same every time, since the limbs are.
  double sum = 0.0;
  for (int i = kLimbs - 1; i >= 0; --i)
    if (copy.limbs_[static_cast<std::size_t>(i)] != 0) sum += std::ldexp(static_cast<double>(copy.limbs_[static_cast<std::size_t>(i)]), 32 * i - kOffset);
  return negative ? -sum : sum;
}

}  // namespace gradfix
