#pragma once
// An exact sum of doubles: every added value is held in a wide fixed-point integer (every double
// from 2^-1074 to 2^1024 fits), so the sum does not depend on the order of the additions. That
// is what makes a number summed over the ranks' pieces (whose boundaries move with P) come out
// bit for bit the same at any number of ranks. Rounded to a double only when read.

#include <array>
#include <cstdint>

namespace gradfix {

class ExactSum {
 public:
  // Limbs of 32 bits from 2^-1152 up to 2^1152: every double, with 128 bits of room for carries.
  static constexpr int kLimbs = 72;

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

}  // namespace gradfix
