#pragma once
// An exact sum of doubles: every added value is held in a wide fixed-point integer (every double
// from 2^-1074 to 2^1024 fits), so the sum does not depend on the order of the additions. That
// is what makes a number summed over the ranks' pieces (whose boundaries move with P) come out
// bit for bit the same at any number of ranks. Rounded to a double only when read.

#include <array>
#include <cstdint>
#include <cstring>

#include "gradfix/io/error.hpp"

namespace gradfix {

class ExactSum {
 public:
  // Limbs of 32 bits from 2^-1152 up to 2^1152: every double, with 128 bits of room for carries.
  static constexpr int kLimbs = 72;
  static constexpr int kOffset = 1152;  // bit 0 of limb 0 is 2^-kOffset: below the smallest double, 2^-1074

  // Inline: a merge adds a few values per entry of a model.
  void add(double value);
  // The sum as a double (within an ulp or so of the exact sum, and the same whatever the order of
  // the additions).
  double value() const;
  // The limbs, carried so that each holds 0 .. 2^32 - 1 but the top one (signed): adding the
  // limbs of several accumulators as int64 (an MPI sum) and carrying again gives the exact total.
  const std::array<std::int64_t, kLimbs>& carried();
  std::array<std::int64_t, kLimbs>& limbs() { return limbs_; }

 private:
  void carry();
  std::array<std::int64_t, kLimbs> limbs_{};
  std::int64_t pending_ = 0;  // additions since the last carry
};

inline void ExactSum::add(double value) {
  // The double's own fields, read as bits (no frexp: this runs once per entry and sum).
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  const int biased = static_cast<int>((bits >> 52) & 0x7ff);
  GRADFIX_CHECK(biased != 0x7ff, "ExactSum::add of a value that is not finite");
  std::uint64_t magnitude = bits & ((1ULL << 52) - 1);
  if (biased != 0) magnitude |= 1ULL << 52;  // a normal number's implicit bit
  if (magnitude == 0) return;
  // |value| = magnitude * 2^(e - 1075), e = 1 for subnormals: bit 0 of the magnitude lands at
  // this position of the limbs (>= 1 - 1075 + 1152 > 0 for every double).
  const int position = (biased == 0 ? 1 : biased) - 1075 + kOffset;
  const bool negative = (bits >> 63) != 0;
  // The magnitude split in 32-bit halves, each shifted into place (below 2^64 each).
  const int shift = position % 32;
  const std::uint64_t low = (magnitude & 0xffffffffULL) << shift, high = (magnitude >> 32) << shift;
  const std::int64_t parts[3] = {static_cast<std::int64_t>(low & 0xffffffffULL),
                                 static_cast<std::int64_t>((low >> 32) + (high & 0xffffffffULL)), static_cast<std::int64_t>(high >> 32)};
  const auto first = static_cast<std::size_t>(position / 32);
  for (std::size_t k = 0; k < 3; ++k) limbs_[first + k] += negative ? -parts[k] : parts[k];
  // Each limb moves by less than 2^33 per addition: carry well before an int64 could overflow.
  if (++pending_ >= (1LL << 28)) carry();
}

}  // namespace gradfix
