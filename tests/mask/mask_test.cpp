#include "gradfix/algebra/mask.hpp"

#include <gtest/gtest.h>

#include <cmath>

#include "../support/test_files.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/algebra/compare.hpp"

namespace gradfix {
namespace {

const std::vector<float> kTau = {0.5f, -1.0f, 2.0f, -0.25f, 0.0f, 3.0f};
const std::vector<float> kStats = {1.0f, 1.0f, -2.0f, -1.0f, 5.0f, 0.0f};

std::vector<float> masked(MaskMode mode, const std::vector<long long>& shape, MaskOptions options = {}) {
  return mask_tensor(mode, options, kTau, kStats, shape, tensor_key_of("w"));
}

void expect_near(const std::vector<float>& actual, const std::vector<double>& expected, double tolerance = 1e-6) {
  ASSERT_EQ(actual.size(), expected.size());
  for (std::size_t i = 0; i < actual.size(); ++i) EXPECT_NEAR(actual[i], expected[i], tolerance) << "element " << i;
}

// Hand-checked values: sign(tau) = [+ - + - 0 +], sign(s) = [+ + - - + 0].
TEST(MaskHandChecked, Normal) { expect_near(masked(MaskMode::kNormal, {6}), {0.5, 0, 0, -0.25, 0, 0}); }
TEST(MaskHandChecked, OracleIsNormalWithTauB) { expect_near(masked(MaskMode::kOracle, {6}), {0.5, 0, 0, -0.25, 0, 0}); }
TEST(MaskHandChecked, Force) { expect_near(masked(MaskMode::kForce, {6}), {0.5, 1.0, -2.0, -0.25, 0, 0}); }

TEST(MaskHandChecked, Soft1UsesTensorNorms) {
  // ||tau|| = sqrt(14.3125), ||sign(s)|| = sqrt(5); out = tau * sigmoid(5 tau g / (||tau|| ||g||)).
  expect_near(masked(MaskMode::kSoft1, {6}), {0.28667435, -0.35639303, 0.46934668, -0.13421845, 0.0, 1.5});
}

TEST(MaskHandChecked, Soft2) {
  // tau * g = [0.5, -1, -2, 0.25, 0, 0]; weights max(tanh(.), 0).
  expect_near(masked(MaskMode::kSoft2, {6}), {0.5 * std::tanh(0.5), 0, 0, -0.25 * std::tanh(0.25), 0, 0});
}

TEST(MaskHandChecked, Soft3) {
  // Agreeing signs at 0 and 3, |g| / (|g| + 1) = 1/2.
  expect_near(masked(MaskMode::kSoft3, {6}), {0.25, 0, 0, -0.125, 0, 0});
}

TEST(MaskHandChecked, Soft3RawInputUsesMagnitudes) {
  MaskOptions options;
  options.raw_soft_input = true;
  const std::vector<float> tau = {1.0f, -2.0f, 1.0f};
  const std::vector<float> stats = {3.0f, -1.0f, -4.0f};
  expect_near(mask_tensor(MaskMode::kSoft3, options, tau, stats, {3}, 0), {0.75, -1.0, 0.0});
}

TEST(MaskHandChecked, RowwiseModesOnTwoRows) {
  // Rows: tau [0.5 -1 2] with g [1 1 -1], tau [-0.25 0 3] with g [-1 1 0].
  expect_near(masked(MaskMode::kSoft1Rowwise, {2, 3}),
              {0.02055147, -0.04110295, 0.08220589, -0.14321993, 0.0, 1.71863915});
  // Row dots -2.5 and 0.25.
  expect_near(masked(MaskMode::kSoft2Rowwise, {2, 3}),
              {0, 0, 0, -0.25 * std::tanh(0.25), 0, 3.0 * std::tanh(0.25)});
  // Row 0: 1/3 agree, mean|g| 1 -> 1/6. Row 1: 1/3 agree, mean|g| 2/3 -> (1/3)(0.4).
  expect_near(masked(MaskMode::kSoft3Rowwise, {2, 3}),
              {0.5 / 6, -1.0 / 6, 2.0 / 6, -0.25 * 0.4 / 3, 0, 3.0 * 0.4 / 3});
}

TEST(MaskHandChecked, RowwiseFallsBackOnVectors) {
  EXPECT_EQ(masked(MaskMode::kSoft1Rowwise, {6}), masked(MaskMode::kSoft1, {6}));
  EXPECT_EQ(masked(MaskMode::kSoft3Rowwise, {6}), masked(MaskMode::kSoft3, {6}));
}

TEST(MaskHandChecked, OptionsChangeTheSoftModes) {
  MaskOptions options;
  options.gamma = 2.0;
  options.c = 3.0;
  expect_near(masked(MaskMode::kSoft2, {6}, options), {0.5 * std::tanh(1.0), 0, 0, -0.25 * std::tanh(0.5), 0, 0});
  expect_near(masked(MaskMode::kSoft3, {6}, options), {0.125, 0, 0, -0.0625, 0, 0});
}

TEST(MaskRandom, KeepsMagnitudesAndIsSeeded) {
  const auto tau = testing::random_values(10000, 7);
  const std::vector<float> unused(tau.size(), 0.0f);
  MaskOptions options;
  options.seed = 42;
  const auto a = mask_tensor(MaskMode::kRandom, options, tau, unused, {100, 100}, tensor_key_of("w"));
  const auto b = mask_tensor(MaskMode::kRandom, options, tau, unused, {100, 100}, tensor_key_of("w"));
  options.seed = 43;
  const auto c = mask_tensor(MaskMode::kRandom, options, tau, unused, {100, 100}, tensor_key_of("w"));
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  long long negative = 0;
  for (std::size_t i = 0; i < tau.size(); ++i) {
    ASSERT_EQ(std::fabs(a[i]), std::fabs(tau[i]));
    negative += a[i] < 0.0f;
  }
  // A fair coin over 10,000 entries: 5,000 +- 5 standard deviations (50).
  EXPECT_NEAR(static_cast<double>(negative), 5000.0, 250.0);
}

TEST(MaskNames, ParseAndReject) {
  EXPECT_EQ(parse_mask_mode("soft2_rowwise"), MaskMode::kSoft2Rowwise);
  EXPECT_STREQ(mask_mode_name(MaskMode::kOracle), "oracle");
  try {
    parse_mask_mode("hard");
    FAIL();
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("'hard'"), std::string::npos);
    EXPECT_NE(std::string(error.what()).find("soft3_rowwise"), std::string::npos);
  }
}

// An independent, literal implementation of the official formulas, one element or row at a
// time in double precision, to check the two-step implementation against.
std::vector<double> reference_mask(MaskMode mode, const MaskOptions& o, const std::vector<float>& t,
                                   const std::vector<float>& s, long long rows, long long cols) {
  auto sign = [](double x) { return static_cast<double>((x > 0) - (x < 0)); };
  std::vector<double> g(s.size());
  const bool soft = mode != MaskMode::kNormal && mode != MaskMode::kForce && mode != MaskMode::kOracle;
  for (std::size_t i = 0; i < s.size(); ++i) g[i] = soft && o.raw_soft_input ? s[i] : sign(s[i]);
  std::vector<double> out(t.size());
  double tt = 0, gg = 0;
  for (std::size_t i = 0; i < t.size(); ++i) {
    tt += double(t[i]) * t[i];
    gg += g[i] * g[i];
  }
  for (long long r = 0; r < rows; ++r) {
    double dot = 0, rt = 0, rg = 0, agree = 0, magnitude = 0;
    for (long long c = 0; c < cols; ++c) {
      const std::size_t i = static_cast<std::size_t>(r * cols + c);
      dot += t[i] * g[i];
      rt += double(t[i]) * t[i];
      rg += g[i] * g[i];
      agree += sign(t[i]) == sign(g[i]);
      magnitude += std::fabs(g[i]);
    }
    for (long long c = 0; c < cols; ++c) {
      const std::size_t i = static_cast<std::size_t>(r * cols + c);
      const double ti = t[i], gi = g[i];
      double w = 1;
      switch (mode) {
        case MaskMode::kNormal:
        case MaskMode::kOracle: w = sign(ti) == gi ? 1 : 0; break;
        case MaskMode::kForce: out[i] = std::fabs(ti) * gi; continue;
        case MaskMode::kSoft1: w = 1 / (1 + std::exp(-o.beta * ti * gi / (std::sqrt(tt) * std::sqrt(gg) + 1e-8))); break;
        case MaskMode::kSoft2: w = std::max(0.0, std::tanh(o.gamma * ti * gi)); break;
        case MaskMode::kSoft3: w = (sign(ti) == sign(gi)) * std::fabs(gi) / (std::fabs(gi) + o.c); break;
        case MaskMode::kSoft1Rowwise: w = 1 / (1 + std::exp(-o.beta * dot / (std::sqrt(rt) * std::sqrt(rg) + 1e-8))); break;
        case MaskMode::kSoft2Rowwise: w = std::max(0.0, std::tanh(o.gamma * dot)); break;
        case MaskMode::kSoft3Rowwise: {
          const double mean = magnitude / cols;
          w = (agree / cols) * mean / (mean + o.c);
          break;
        }
        default: break;
      }
      out[i] = w * ti;
    }
  }
  return out;
}

class MaskAgainstReference : public ::testing::TestWithParam<std::tuple<MaskMode, bool>> {};

TEST_P(MaskAgainstReference, RandomTensorsAnyChunking) {
  const auto [mode, raw] = GetParam();
  const long long rows = 7, cols = 13;
  auto tau = testing::random_values(rows * cols, 11, 0.3f);
  auto stats = testing::random_values(rows * cols, 12, 4.0f);
  for (std::size_t i = 0; i < stats.size(); i += 5) stats[i] = std::round(stats[i]);  // vote-like, some zeros
  tau[3] = 0.0f;
  MaskOptions options;
  options.raw_soft_input = raw;
  options.beta = 3.0;
  const auto expected = reference_mask(mode, options, tau, stats, rows, cols);
  expect_near(mask_tensor(mode, options, tau, stats, {rows, cols}, 0), expected, 1e-5);

  // The same result when the tensor arrives in uneven chunks, as on several ranks.
  const MaskPlan plan = plan_mask(mode, {rows, cols});
  std::vector<double> sums(static_cast<std::size_t>(plan.rows * plan.sums_per_row), 0.0);
  const long long cuts[] = {0, 5, 40, 41, 91};
  for (int k = 0; k + 1 < 5; ++k)
    accumulate_mask_sums(plan, options, tau.data() + cuts[k], stats.data() + cuts[k], cuts[k], cuts[k + 1] - cuts[k], sums.data());
  std::vector<float> chunked(tau.size());
  for (int k = 0; k + 1 < 5; ++k)
    apply_mask(plan, options, tau.data() + cuts[k], stats.data() + cuts[k], cuts[k], cuts[k + 1] - cuts[k], sums.data(), 0,
               chunked.data() + cuts[k]);
  expect_near(chunked, expected, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    EveryMode, MaskAgainstReference,
    ::testing::Combine(::testing::Values(MaskMode::kNormal, MaskMode::kForce, MaskMode::kSoft1, MaskMode::kSoft2,
                                         MaskMode::kSoft3, MaskMode::kSoft1Rowwise, MaskMode::kSoft2Rowwise,
                                         MaskMode::kSoft3Rowwise, MaskMode::kOracle),
                       ::testing::Bool()));

TEST(PairStats, HandChecked) {
  PairStats stats;
  stats.add(kTau.data(), kStats.data(), 6);
  // Equal signs at 0, 3: two of six.
  EXPECT_EQ(stats.sign_agreements, 2);
  EXPECT_DOUBLE_EQ(stats.sign_agreement(), 2.0 / 6.0);
  EXPECT_EQ(stats.nonzero_a, 5);
  EXPECT_EQ(stats.nonzero_b, 5);
  // dot = 0.5 - 1 - 4 + 0.25 = -4.25; |a|^2 = 14.3125; |b|^2 = 1 + 1 + 4 + 1 + 25 = 32.
  EXPECT_DOUBLE_EQ(stats.dot, -4.25);
  EXPECT_NEAR(stats.cosine(), -4.25 / std::sqrt(14.3125 * 32.0), 1e-12);
}

}  // namespace
}  // namespace gradfix

namespace gradfix {
namespace {

// The random control keeps exactly `keep` non-zero entries of tau, with tau's own values, chosen
// from the seed and tensor alone; every subset is reachable, so two seeds disagree somewhere.
TEST(RandomKeep, KeepsExactlyTheCountWithTauValues) {
  std::vector<float> tau(1000);
  for (std::size_t i = 0; i < tau.size(); ++i) tau[i] = i % 7 == 0 ? 0.0f : static_cast<float>(i) - 500.5f;
  long long nonzero = 0;
  for (float value : tau) nonzero += value != 0.0f;
  for (long long keep : {0LL, 1LL, 300LL, nonzero}) {
    const std::vector<float> out = random_keep(tau, keep, 3, tensor_key_of("w"));
    long long kept = 0;
    for (std::size_t i = 0; i < tau.size(); ++i)
      if (out[i] != 0.0f) {
        ++kept;
        EXPECT_EQ(out[i], tau[i]) << "entry " << i;
      }
    EXPECT_EQ(kept, keep);
  }
  EXPECT_EQ(random_keep(tau, 300, 3, tensor_key_of("w")), random_keep(tau, 300, 3, tensor_key_of("w")));
  EXPECT_NE(random_keep(tau, 300, 3, tensor_key_of("w")), random_keep(tau, 300, 4, tensor_key_of("w")));
  EXPECT_NE(random_keep(tau, 300, 3, tensor_key_of("w")), random_keep(tau, 300, 3, tensor_key_of("v")));
  EXPECT_THROW(random_keep(tau, nonzero + 1, 3, 0), std::invalid_argument);
  EXPECT_THROW(random_keep(tau, -1, 3, 0), std::invalid_argument);
}

// Uniform over positions: over many seeds each of 10 non-zero entries is kept about keep/10 of
// the time (a biased shuffle would favour the first or last entries).
TEST(RandomKeep, ChoosesPositionsUniformly) {
  const std::vector<float> tau = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  std::vector<int> hits(10, 0);
  const int runs = 20000;
  for (int seed = 0; seed < runs; ++seed) {
    const std::vector<float> out = random_keep(tau, 3, static_cast<std::uint64_t>(seed), 0);
    for (std::size_t i = 0; i < out.size(); ++i) hits[i] += out[i] != 0.0f;
  }
  // Expected 6000 per position; binomial std ~65, so 5 sigma is about 325.
  for (int count : hits) EXPECT_NEAR(count, runs * 3 / 10, 325);
}

}  // namespace
}  // namespace gradfix
