// The shot selection strategies (gradfix/io/selection.hpp) on small feature matrices whose
// answers were worked out by hand from the official definitions.
#include "gradfix/io/selection.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "gradfix/io/error.hpp"
#include "gradfix/io/dataset.hpp"

namespace gradfix {
namespace {

FeatureMatrix matrix(const std::vector<std::vector<float>>& rows) {
  FeatureMatrix out;
  out.rows = static_cast<long long>(rows.size());
  out.dim = static_cast<long long>(rows[0].size());
  for (const auto& row : rows) out.values.insert(out.values.end(), row.begin(), row.end());
  return out;
}

FeatureMatrix at_degrees(const std::vector<double>& degrees) {
  std::vector<std::vector<float>> rows;
  for (double d : degrees) rows.push_back({static_cast<float>(std::cos(d * M_PI / 180.0)), static_cast<float>(std::sin(d * M_PI / 180.0))});
  return matrix(rows);
}

TEST(Selection, CoresetStartsAtTheMedoidThenTakesTheNearestToTheSelected) {
  // Points 0, 1, 2, 10 on a line: summed distances 13, 11, 11, 27, so row 1 first (the earlier of
  // the tie); then rows 0 and 2 are both 1 away (row 0 first), then row 2 (1 away), never row 3.
  const FeatureMatrix points = matrix({{0}, {1}, {2}, {10}});
  EXPECT_EQ(coreset_rows(points, 1), (std::vector<long long>{1}));
  EXPECT_EQ(coreset_rows(points, 3), (std::vector<long long>{1, 0, 2}));
  EXPECT_EQ(coreset_rows(points, 4), (std::vector<long long>{1, 0, 2, 3}));
}

TEST(Selection, HerdingKeepsTheSelectedMeanNearTheClassMean) {
  // a = (1, 0), b = (0, 1), c = (0.6, 0.8), d = (0.28, 0.96): class mean (0.47, 0.69),
  // normalised m = (0.5630, 0.8265). Step 1: c is 0.046 from m (d 0.313, b 0.589, a 0.935): c.
  // Step 2: (c + d) / 2 is 0.134 from m, (c + b) / 2 0.273, (c + a) / 2 0.488: d.
  // Step 3: (c + d + a) / 3 is 0.248 from m, (c + d + b) / 3 0.285: a.
  const FeatureMatrix points = matrix({{1, 0}, {0, 1}, {0.6f, 0.8f}, {0.28f, 0.96f}});
  EXPECT_EQ(herding_rows(points, 3), (std::vector<long long>{2, 3, 0}));
}

TEST(Selection, KMedoidsTakesTheMiddleOfEachCluster) {
  // Two clusters of unit vectors at 0, 10, 20 and 70, 80, 90 degrees: the centres point at 10
  // and 80 degrees, and the rows most similar to them are rows 1 and 4, for any seed.
  const FeatureMatrix points = at_degrees({0, 10, 20, 70, 80, 90});
  for (std::uint64_t seed = 0; seed < 10; ++seed) {
    std::vector<long long> chosen = kmedoids_rows(points, 2, seed);
    std::sort(chosen.begin(), chosen.end());
    EXPECT_EQ(chosen, (std::vector<long long>{1, 4})) << "seed " << seed;
  }
  // Every row chosen once when k is the number of rows.
  std::vector<long long> all = kmedoids_rows(points, 6, 3);
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, (std::vector<long long>{0, 1, 2, 3, 4, 5}));
}

TEST(Selection, PerClassNormalisesAndMapsBackToDatasetRows) {
  // Class 0 at rows 1, 3, 5, 7 with features k * (3, 4) (normalised: all equal, so coreset's
  // sums tie everywhere and it takes the first rows); class 1 at rows 0, 2, 4, 6.
  const std::vector<long long> labels = {1, 0, 1, 0, 1, 0, 1, 0};
  const std::vector<long long> pool = {0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<std::vector<long long>> asked;
  const FeatureSource features = [&](const std::vector<long long>& rows) {
    asked.push_back(rows);
    FeatureMatrix out;
    out.rows = static_cast<long long>(rows.size());
    out.dim = 2;
    for (long long r : rows) {
      // Class 1: on the unit circle at 0, 10, 25, 90 degrees by row; class 0: multiples of (3, 4).
      const double degrees = labels[static_cast<std::size_t>(r)] == 1 ? std::vector<double>{0, 10, 25, 90}[static_cast<std::size_t>(r / 2)] : -1;
      if (degrees < 0) {
        out.values.push_back(static_cast<float>(3 * (r + 1)));
        out.values.push_back(static_cast<float>(4 * (r + 1)));
      } else {
        out.values.push_back(static_cast<float>(std::cos(degrees * M_PI / 180.0)));
        out.values.push_back(static_cast<float>(std::sin(degrees * M_PI / 180.0)));
      }
    }
    return out;
  };
  const auto chosen = select_per_class(labels, pool, 2, 2, ShotStrategy::kCoreset, 0, features);
  // Class 0: identical after normalisation, rows 1 and 3. Class 1 (0, 10, 25, 90 degrees at rows
  // 0, 2, 4, 6): summed chord lengths 2.021, 1.721, 1.769, 4.2, so 10 degrees (row 2) first;
  // then 0 degrees (0.174 away) before 25 (0.261): row 0.
  EXPECT_EQ(chosen, (std::vector<long long>{1, 3, 2, 0}));
  ASSERT_EQ(asked.size(), 2u);
  EXPECT_EQ(asked[0], (std::vector<long long>{1, 3, 5, 7}));
  EXPECT_EQ(asked[1], (std::vector<long long>{0, 2, 4, 6}));
  // Random ignores the features and equals sample_per_class.
  asked.clear();
  EXPECT_EQ(select_per_class(labels, pool, 2, 2, ShotStrategy::kRandom, 5, features), sample_per_class(labels, pool, 2, 2, 5));
  EXPECT_TRUE(asked.empty());
  EXPECT_THROW(select_per_class(labels, pool, 2, 5, ShotStrategy::kHerding, 0, features), InputError);
}

TEST(Selection, StrategyNames) {
  for (const char* name : {"random", "coreset", "kmedoids", "herding"}) EXPECT_STREQ(shot_strategy_name(parse_shot_strategy(name)), name);
  try {
    parse_shot_strategy("medoid");
    FAIL() << "accepted";
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("random|coreset|kmedoids|herding"), std::string::npos);
  }
}

}  // namespace
}  // namespace gradfix
