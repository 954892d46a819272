// Per-sample statistics (src/model/sample_statistics.hpp) against a brute-force reference: the
// products formed whole with bmm, their signs of -gradient summed (max mode) or the -gradients
// summed in float64 (mean mode), on every count type, in tiles that do and do not divide the
// rows, with a transposed left factor as the captures pass it, a 4-D statistics tensor (a
// convolution's) and a hook that changes a tile before its signs are taken. Also the pool of
// tensor blocks (src/model/runtime.cpp): a freed block is reused for the same size.
#include <gtest/gtest.h>

#include <vector>

#include "../../src/model/sample_statistics.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {
namespace {

constexpr int64_t kSamples = 5, kRows = 13, kInner = 7, kCols = 6;

struct Factors {
  torch::Tensor left;   // [n, rows, k]
  torch::Tensor right;  // [n, k, cols]
};

Factors make_factors() {
  torch::manual_seed(3);
  Factors f{torch::randn({kSamples, kRows, kInner}), torch::randn({kSamples, kInner, kCols})};
  f.left[1][4].zero_();  // sample 1, row 4: products exactly 0, which cast no vote
  return f;
}

// Three rows per tile: 13 rows make five tiles, the last of one row.
constexpr long long kTileBytes = kSamples * kCols * 4 * 3;

TEST(SampleStatistics, VoteCountsEqualSummedSignsOnEveryCountType) {
  const Factors f = make_factors();
  const torch::Tensor products = torch::bmm(f.left, f.right);
  for (const auto type : {torch::kChar, torch::kShort, torch::kInt}) {
    Accumulators accumulators(type, torch::kCPU, kTileBytes);
    torch::Tensor& target = accumulators.of("w", {kRows, kCols});
    target.copy_(torch::randint(-3, 4, {kRows, kCols}));  // statistics of earlier groups
    const torch::Tensor expected = target.to(torch::kInt64) + (-products).sign().sum(0).to(torch::kInt64);
    accumulators.add_products(target, f.left, f.right);
    EXPECT_TRUE(torch::equal(target.to(torch::kInt64), expected)) << "count type " << c10::toString(type);
    EXPECT_EQ(target.scalar_type(), type);
  }
  // The zero products of sample 1, row 4 voted 0: that row's counts come from the other four.
  Accumulators accumulators(torch::kChar, torch::kCPU, kTileBytes);
  torch::Tensor& target = accumulators.of("w", {kRows, kCols});
  accumulators.add_products(target, f.left, f.right);
  EXPECT_LE(target[4].abs().max().item<int>(), kSamples - 1);
}

TEST(SampleStatistics, SumsInFloat64EqualTheNegatedSum) {
  const Factors f = make_factors();
  Accumulators accumulators(torch::kDouble, torch::kCPU, kTileBytes);
  torch::Tensor& target = accumulators.of("w", {kRows, kCols});
  target.fill_(0.25);
  accumulators.add_products(target, f.left, f.right);
  const torch::Tensor expected = 0.25 + (-torch::bmm(f.left, f.right)).sum(0, false, torch::kDouble);
  // A BLAS may round a product of 3 rows differently from one of 13 (MKL does): float32's ulp.
  EXPECT_TRUE(torch::allclose(target, expected, 1e-6, 1e-6));
}

TEST(SampleStatistics, TransposedLeftFactorAndFourDimensionalStatistics) {
  const Factors f = make_factors();
  // G [n, T, out] as recorded, passed as G^T: a transposed view, not a copy.
  const torch::Tensor recorded = f.left.transpose(1, 2).contiguous();
  Accumulators accumulators(torch::kInt, torch::kCPU, kTileBytes);
  torch::Tensor& target = accumulators.of("conv", {kRows, 2, 3, 1});
  accumulators.add_products(target, recorded.transpose(1, 2), f.right);
  const torch::Tensor expected = (-torch::bmm(f.left, f.right)).sign().sum(0).to(torch::kInt).view({kRows, 2, 3, 1});
  EXPECT_TRUE(torch::equal(target, expected));
}

TEST(SampleStatistics, HookSeesEveryTileBeforeItsSigns) {
  const Factors f = make_factors();
  Accumulators accumulators(torch::kInt, torch::kCPU, kTileBytes);
  torch::Tensor& target = accumulators.of("w", {kRows, kCols});
  std::vector<std::pair<int64_t, int64_t>> tiles;
  accumulators.add_products(target, f.left, f.right, [&](torch::Tensor& tile, int64_t begin, int64_t end) {
    EXPECT_EQ(tile.size(1), end - begin);
    tiles.emplace_back(begin, end);
    if (begin <= 4 && 4 < end) tile[0][4 - begin] += 1000.0f;  // sample 0, row 4: now positive everywhere
  });
  const std::vector<std::pair<int64_t, int64_t>> expected_tiles = {{0, 3}, {3, 6}, {6, 9}, {9, 12}, {12, 13}};
  EXPECT_EQ(tiles, expected_tiles);
  torch::Tensor products = torch::bmm(f.left, f.right);
  products[0][4] += 1000.0f;
  EXPECT_TRUE(torch::equal(target, (-products).sign().sum(0).to(torch::kInt)));
}

TEST(TensorMemory, FreedBlockIsReusedForTheSameSize) {
  configure_tensor_memory();
  torch::Tensor first = torch::full({1 << 19}, 3.0f);  // 2 MiB: from the pool
  void* const block = first.data_ptr();
  first = torch::Tensor();
  torch::Tensor second = torch::zeros({1 << 19});
  EXPECT_EQ(second.data_ptr(), block);
  EXPECT_EQ(second.sum().item<float>(), 0.0f);  // a reused block holds what it is given
  torch::Tensor third = torch::ones({1 << 19});  // the block is taken: a new one
  EXPECT_NE(third.data_ptr(), block);
  EXPECT_EQ(third.sum().item<float>(), static_cast<float>(1 << 19));
  release_kept_tensor_memory();
}

}  // namespace
}  // namespace gradfix
