// The alpha rule every transport shares (transport.hpp): hand-checked curves.
#include <gtest/gtest.h>

#include <limits>
#include <sstream>
#include <string>

#include "../../src/model/transport.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

std::vector<AlphaPoint> curve(const std::vector<double>& grid, const std::vector<double>& losses, const std::vector<double>& accuracies) {
  std::vector<AlphaPoint> points;
  for (std::size_t i = 0; i < grid.size(); ++i) points.push_back({grid[i], losses[i], 0.0, accuracies[i]});
  return points;
}

TEST(AlphaPolicy, SupportAccuracyTakesTheHighestAndTheEarlierOnTies) {
  AlphaPolicy policy;
  policy.grid = {0.1, 0.5, 1.0, 2.0};
  policy.metric = AlphaPolicy::Metric::kSupportAccuracy;
  // The losses would choose 2.0; the accuracy chooses 0.5, the first of the two 0.7s.
  EXPECT_EQ(policy.choose(curve(policy.grid, {4, 3, 2, 1}, {0.6, 0.7, 0.7, 0.5})), 1u);
  EXPECT_EQ(policy.description(), "support accuracy");
}

TEST(AlphaPolicy, SupportLossTakesTheLowestFiniteAndTheEarlierOnTies) {
  AlphaPolicy policy;
  policy.grid = {0.1, 0.5, 1.0, 2.0, 3.0};
  policy.metric = AlphaPolicy::Metric::kSupportLoss;
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  // NaN and -inf (an overshooting alpha) are never chosen; 1.0 and 3.0 tie at 0.25: 1.0.
  EXPECT_EQ(policy.choose(curve(policy.grid, {nan, 0.5, 0.25, -inf, 0.25}, {0.9, 0.1, 0.1, 0.9, 0.1})), 2u);
  EXPECT_EQ(policy.description(), "support mean loss");
}

TEST(AlphaPolicy, NoFiniteSupportLossIsRefused) {
  AlphaPolicy policy;
  policy.grid = {1.0, 2.0};
  const double inf = std::numeric_limits<double>::infinity();
  try {
    policy.choose(curve(policy.grid, {inf, std::numeric_limits<double>::quiet_NaN()}, {0, 0}));
    ADD_FAILURE() << "accepted";
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("every alpha of the grid gives a non-finite loss"), std::string::npos) << error.what();
  }
}

// The grid the CLI shows and parses (kDefaultAlphaGrid) is the grid a job without --alphas searches.
TEST(AlphaPolicy, TheDefaultGridIsTheCliDefault) {
  std::vector<double> parsed;
  std::stringstream text(kDefaultAlphaGrid);
  for (std::string item; std::getline(text, item, ',');) parsed.push_back(std::stod(item));
  EXPECT_EQ(parsed, AlphaPolicy().grid);
  EXPECT_EQ(parsed, default_alphas());
}

}  // namespace
}  // namespace gradfix
