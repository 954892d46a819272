#include "gradfix/io/exact_sum.hpp"

#include <cmath>
#include <cstring>

#include "gradfix/io/error.hpp"

namespace gradfix {
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
    if (copy.limbs_[static_cast<std::size_t>(i)] != 0) sum += std::ldexp(static_cast<double>(copy.limbs_[static_cast<std::size_t>(i)]), 32 * i - ExactSum::kOffset);
  return negative ? -sum : sum;
}

}  // namespace gradfix
