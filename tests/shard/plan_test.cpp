#include "gradfix/dist/plan.hpp"

#include <gtest/gtest.h>

#include <algorithm>

namespace gradfix {
namespace {

std::vector<TensorInfo> model() {
  return {{"embed", DType::kBF16, {1000, 64}}, {"w", DType::kF32, {64, 64}}, {"b", DType::kF32, {64}},
          {"long", DType::kF32, {50000}},      {"empty", DType::kF32, {0}},   {"scalar", DType::kF64, {}}};
}

// Every element of every tensor is owned by exactly one rank, in order, for any P.
TEST(ShardPlan, CoversEveryElementOnceForAnyRankCount) {
  const auto tensors = model();
  for (int ranks = 1; ranks <= 9; ++ranks) {
    const ShardPlan plan(tensors, ranks);
    std::vector<long long> next(tensors.size(), 0);
    for (int r = 0; r < ranks; ++r) {
      for (const auto& piece : plan.pieces(r)) {
        ASSERT_EQ(piece.begin, next[piece.tensor]) << "ranks " << ranks << " rank " << r;
        ASSERT_GT(piece.count, 0);
        next[piece.tensor] += piece.count;
      }
    }
    for (std::size_t t = 0; t < tensors.size(); ++t) EXPECT_EQ(next[t], tensors[t].numel()) << tensors[t].name;
  }
}

TEST(ShardPlan, CutsFallOnRowsAndVectorBlocks) {
  const auto tensors = model();
  for (int ranks = 2; ranks <= 9; ++ranks) {
    const ShardPlan plan(tensors, ranks);
    for (int r = 0; r < ranks; ++r)
      for (const auto& piece : plan.pieces(r)) {
        const long long unit = split_unit(tensors[piece.tensor]);
        EXPECT_EQ(piece.begin % unit, 0) << tensors[piece.tensor].name;
        const long long end = piece.begin + piece.count;
        EXPECT_TRUE(end % unit == 0 || end == tensors[piece.tensor].numel());
      }
  }
  EXPECT_EQ(split_unit(tensors[0]), 64);
  EXPECT_EQ(split_unit(tensors[3]), kVectorSplitUnit);
}

// Balanced by bytes: no rank is further from the mean than the largest split unit in bytes.
TEST(ShardPlan, BalancedByBytes) {
  const auto tensors = model();
  long long total = 0;
  for (const auto& tensor : tensors) total += tensor.nbytes();
  for (int ranks = 1; ranks <= 8; ++ranks) {
    const ShardPlan plan(tensors, ranks);
    long long sum = 0;
    for (int r = 0; r < ranks; ++r) {
      sum += plan.bytes(r);
      EXPECT_LE(std::llabs(plan.bytes(r) - total / ranks), kVectorSplitUnit * 4 + 8) << ranks << " ranks, rank " << r;
    }
    EXPECT_EQ(sum, total);
  }
  const ShardPlan two(tensors, 2);
  EXPECT_TRUE(two.is_split(3));  // the 200 KB vector holds the middle of the 336 KB total
  EXPECT_FALSE(two.is_split(0));
}

TEST(ShardPlan, ChunksRespectUnitsAndLimit) {
  const auto chunks = chunks_of({0, 64 * 3, 64 * 20}, 64, 1000);  // step: 960 elements
  long long next = 64 * 3;
  for (const auto& chunk : chunks) {
    EXPECT_EQ(chunk.begin, next);
    EXPECT_LE(chunk.count, 960);
    EXPECT_EQ((chunk.begin + chunk.count) % 64, 0);
    next += chunk.count;
  }
  EXPECT_EQ(next, 64 * 23);
  // A unit larger than the limit: one unit per chunk.
  EXPECT_EQ(chunks_of({0, 0, 3000}, 1000, 10).size(), 3u);
}

}  // namespace
}  // namespace gradfix
