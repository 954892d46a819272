// ExactSum: order-independent, exact where double arithmetic is not.
#include "gradfix/io/exact_sum.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace gradfix {
namespace {

TEST(ExactSum, CancellationThatDoubleArithmeticLoses) {
  ExactSum sum;
  for (double value : {1e16, 1.0, -1e16, 1e-300, -1e-300, 3.0}) sum.add(value);
  EXPECT_EQ(sum.value(), 4.0);  // in double, 1e16 + 1 - 1e16 is 0
  ExactSum tiny;
  tiny.add(4.9406564584124654e-324);  // the smallest double
  tiny.add(4.9406564584124654e-324);
  EXPECT_EQ(tiny.value(), 2 * 4.9406564584124654e-324);
  ExactSum negative;
  negative.add(-2.5);
  negative.add(1e300);
  negative.add(-1e300);
  EXPECT_EQ(negative.value(), -2.5);
  // Across the subnormal boundary: the smallest normal less the smallest subnormal is the largest
  // subnormal; the largest double twice, less once, is itself.
  ExactSum boundary;
  boundary.add(2.2250738585072014e-308);
  boundary.add(-4.9406564584124654e-324);
  EXPECT_EQ(boundary.value(), 2.2250738585072009e-308);
  ExactSum huge;
  for (double value : {1.7976931348623157e308, 1.7976931348623157e308, -1.7976931348623157e308, -0.0}) huge.add(value);
  EXPECT_EQ(huge.value(), 1.7976931348623157e308);
}

TEST(ExactSum, AnyOrderAndAnySplitGiveTheSameBits) {
  std::mt19937_64 generator(5);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> values;
  for (int i = 0; i < 5000; ++i) values.push_back(normal(generator) * std::pow(10.0, static_cast<double>(i % 13) - 6));
  ExactSum reference;
  for (double v : values) reference.add(v);
  for (int trial = 0; trial < 5; ++trial) {
    std::shuffle(values.begin(), values.end(), generator);
    // Split over "ranks" at random boundaries, their carried limbs added as an MPI sum would.
    ExactSum parts[3];
    for (std::size_t i = 0; i < values.size(); ++i) parts[(i * 7 + static_cast<std::size_t>(trial)) % 3].add(values[i]);
    ExactSum total;
    for (auto& part : parts) {
      const auto& limbs = part.carried();
      for (int l = 0; l < ExactSum::kLimbs; ++l) total.limbs()[static_cast<std::size_t>(l)] += limbs[static_cast<std::size_t>(l)];
    }
    EXPECT_EQ(total.value(), reference.value()) << "trial " << trial;
  }
}

}  // namespace
}  // namespace gradfix
