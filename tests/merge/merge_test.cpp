#include "gradfix/algebra/merge.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../support/test_files.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

const std::vector<float> kV1 = {1.0f, -3.0f, 0.5f, 0.0f, 1.0f};
const std::vector<float> kV2 = {3.0f, 1.0f, -0.5f, 0.0f, -1.0f};
const std::vector<float> kV3 = {-1.0f, 1.5f, 0.25f, 2.0f, 0.0f};

std::vector<float> merged(MergeMethod method, TiesElect elect, std::vector<float> thresholds) {
  std::vector<float> out(5);
  merge_values(method, elect, {kV1.data(), kV2.data(), kV3.data()}, 5, thresholds, out.data());
  return out;
}

TEST(MergeHandChecked, MeanAndSum) {
  const auto mean = merged(MergeMethod::kMean, TiesElect::kCount, {});
  const std::vector<float> expected_mean = {1.0f, -0.5f / 3, 0.25f / 3, 2.0f / 3, 0.0f};
  for (int i = 0; i < 5; ++i) EXPECT_FLOAT_EQ(mean[i], expected_mean[i]);
  EXPECT_EQ(merged(MergeMethod::kSum, TiesElect::kCount, {}), (std::vector<float>{3.0f, -0.5f, 0.25f, 2.0f, 0.0f}));
}

TEST(MergeHandChecked, TiesWithoutTrimByCountAndMass) {
  const std::vector<float> keep_all = {0.0f, 0.0f, 0.0f};
  // Element 1: votes + + - (count elects +, mean of 1 and 1.5); summed mass -0.5 elects -.
  // Element 4: one vote each way: count breaks the tie to +, mass 0 elects nothing.
  EXPECT_EQ(merged(MergeMethod::kTies, TiesElect::kCount, keep_all), (std::vector<float>{2.0f, 1.25f, 0.375f, 2.0f, 1.0f}));
  EXPECT_EQ(merged(MergeMethod::kTies, TiesElect::kMass, keep_all), (std::vector<float>{2.0f, -3.0f, 0.375f, 2.0f, 0.0f}));
}

TEST(MergeHandChecked, TiesTrimsToTheTopFraction) {
  // Keep 2 of 5 per vector; entries equal to the 2nd largest magnitude stay:
  // v1 -> [1 -3 0 0 1], v2 -> [3 1 0 0 -1], v3 -> [0 1.5 0 2 0].
  const long long k = ties_keep_count(5, 0.4);
  ASSERT_EQ(k, 2);
  std::vector<float> thresholds;
  for (const auto* v : {&kV1, &kV2, &kV3}) thresholds.push_back(kth_largest_magnitude(v->data(), 5, k));
  EXPECT_EQ(thresholds, (std::vector<float>{1.0f, 1.0f, 1.5f}));
  EXPECT_EQ(merged(MergeMethod::kTies, TiesElect::kCount, thresholds), (std::vector<float>{2.0f, 1.25f, 0.0f, 2.0f, 1.0f}));
  EXPECT_EQ(merged(MergeMethod::kTies, TiesElect::kMass, thresholds), (std::vector<float>{2.0f, -3.0f, 0.0f, 2.0f, 0.0f}));
}

TEST(MergeHandChecked, KeepCount) {
  EXPECT_EQ(ties_keep_count(10, 0.2), 2);
  EXPECT_EQ(ties_keep_count(10, 0.01), 1);
  EXPECT_EQ(ties_keep_count(3, 0.5), 2);
  EXPECT_EQ(ties_keep_count(10, 1.0), 10);
  EXPECT_EQ(ties_keep_count(10, 0.0), 0);
  EXPECT_EQ(ties_keep_count(0, 0.5), 0);
  EXPECT_EQ(kth_largest_magnitude(kV1.data(), 5, 0), std::numeric_limits<float>::infinity());
  EXPECT_EQ(kth_largest_magnitude(kV1.data(), 5, 6), 0.0f);
}

TEST(MergeNames, ParseAndReject) {
  EXPECT_EQ(parse_merge_method("ties"), MergeMethod::kTies);
  EXPECT_EQ(parse_merge_order("merge-then-mask"), MergeOrder::kMergeThenMask);
  EXPECT_EQ(parse_ties_elect("mass"), TiesElect::kMass);
  EXPECT_EQ(parse_ties_scope("global"), TiesScope::kGlobal);
  EXPECT_THROW(parse_merge_method("dare"), InputError);
  EXPECT_THROW(parse_ties_elect("vote"), InputError);
}

// The k-th largest magnitude from the two-pass histogram equals a full sort, for values with
// duplicates, signed zeros and a wide range of exponents, fed in uneven chunks.
TEST(KthLargestMagnitude, MatchesSorting) {
  auto values = testing::random_values(5000, 21);
  for (std::size_t i = 0; i < values.size(); i += 7) values[i] = values[i / 2];  // duplicates
  for (std::size_t i = 0; i < values.size(); i += 11) values[i] *= 1e-30f;
  values[5] = -0.0f;
  values[6] = 0.0f;
  std::vector<float> sorted(values.size());
  std::transform(values.begin(), values.end(), sorted.begin(), [](float v) { return std::fabs(v); });
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  for (long long k : {1LL, 2LL, 17LL, 1000LL, 4999LL, 5000LL, 5001LL}) {
    KthLargestMagnitude selection(k);
    while (selection.needs_pass()) {
      selection.add(values.data(), 1234);
      selection.add(values.data() + 1234, 5000 - 1234);
      selection.next_pass();
    }
    const float expected = k > 5000 ? 0.0f : sorted[static_cast<std::size_t>(k - 1)];
    EXPECT_EQ(selection.threshold(), expected) << "k = " << k;
    if (k <= 5000) {
      EXPECT_EQ(kth_largest_magnitude(values.data(), 5000, k), expected);
    }
  }
  KthLargestMagnitude none(0);
  EXPECT_FALSE(none.needs_pass());
  EXPECT_EQ(none.threshold(), std::numeric_limits<float>::infinity());
}

// The same past the first pass's direct counts (2^18 values), where it counts in four interleaved
// lanes: 700,001 values clustered in few buckets (as deltas are), fed in chunks of 65,536 and a
// ragged tail, the lanes folded in before the second pass.
TEST(KthLargestMagnitude, MatchesSortingPastTheLaneThreshold) {
  const std::size_t n = 700001;
  auto values = testing::random_values(static_cast<long long>(n), 22);
  for (std::size_t i = 0; i < n; ++i) values[i] = std::round(values[i] * 64.0f) / 64.0f + (i % 3 == 0 ? 1e-3f : 0.0f);
  std::vector<float> sorted(n);
  std::transform(values.begin(), values.end(), sorted.begin(), [](float v) { return std::fabs(v); });
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  for (long long k : {1LL, 262144LL, 262145LL, 350000LL, 699999LL, 700001LL}) {
    KthLargestMagnitude selection(k);
    while (selection.needs_pass()) {
      for (std::size_t first = 0; first < n; first += 65536)
        selection.add(values.data() + first, static_cast<long long>(std::min<std::size_t>(65536, n - first)));
      selection.next_pass();
    }
    EXPECT_EQ(selection.threshold(), sorted[static_cast<std::size_t>(k - 1)]) << "k = " << k;
  }
}

// TIES against a brute-force loop: trim by sorting, elect, average, for random vectors.
TEST(MergeAgainstReference, TiesRandomVectors) {
  const long long n = 300;
  std::vector<std::vector<float>> vectors;
  for (int v = 0; v < 4; ++v) vectors.push_back(testing::random_values(n, 30 + v));
  for (auto& value : vectors[2]) value = std::round(value * 2) / 2;  // ties in magnitude
  for (TiesElect elect : {TiesElect::kCount, TiesElect::kMass}) {
    for (double fraction : {0.05, 0.2, 0.5, 1.0}) {
      const long long k = ties_keep_count(n, fraction);
      std::vector<std::vector<float>> trimmed = vectors;
      std::vector<float> thresholds;
      for (auto& vector : trimmed) {
        std::vector<float> magnitudes;
        for (float value : vector) magnitudes.push_back(std::fabs(value));
        std::sort(magnitudes.begin(), magnitudes.end(), std::greater<float>());
        const float threshold = magnitudes[static_cast<std::size_t>(k - 1)];
        thresholds.push_back(threshold);
        for (float& value : vector)
          if (std::fabs(value) < threshold) value = 0.0f;
      }
      std::vector<const float*> pointers;
      for (const auto& vector : vectors) pointers.push_back(vector.data());
      std::vector<float> actual(n);
      merge_values(MergeMethod::kTies, elect, pointers, n, thresholds, actual.data());
      for (long long i = 0; i < n; ++i) {
        double mass = 0;
        int positive = 0, negative = 0;
        for (const auto& vector : trimmed) {
          mass += vector[i];
          positive += vector[i] > 0;
          negative += vector[i] < 0;
        }
        int elected = elect == TiesElect::kMass ? (mass > 0) - (mass < 0)
                                                : (positive + negative == 0 ? 0 : (positive >= negative ? 1 : -1));
        double total = 0;
        int count = 0;
        for (const auto& vector : trimmed) {
          if (vector[i] != 0 && ((vector[i] > 0) - (vector[i] < 0)) == elected) {
            total += vector[i];
            ++count;
          }
        }
        ASSERT_NEAR(actual[i], count ? total / count : 0.0, 1e-6) << "element " << i << " fraction " << fraction;
      }
    }
  }
}

}  // namespace
}  // namespace gradfix
