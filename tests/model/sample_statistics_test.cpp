// Per-sample statistics (src/model/sample_statistics.hpp) against a brute-force reference: the
// products formed whole with bmm, their signs of -gradient summed (max mode) or the -gradients
// summed in float64 (mean mode), on every count type, in tiles that do and do not divide the
// rows, with a transposed left factor as the captures pass it, a 4-D statistics tensor (a
// convolution's) and a hook that changes a tile before its signs are taken. Also the pool of
// tensor blocks (src/model/runtime.cpp): a freed block is reused for the same size.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "../../src/model/sample_statistics.hpp"
#include "gradfix/io/error.hpp"
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

// --vote-precision bf16: both factors rounded to bfloat16, the products accumulated in float32;
// the votes are the signs of those products, so they equal float32 votes of the rounded factors
// (products this small are formed so; larger ones by the fast kernel, tested below by their bound).
TEST(SampleStatistics, Bfloat16ProductsVoteAsTheirRoundedFactorsDo) {
  const Factors f = make_factors();
  const torch::Tensor rounded = torch::bmm(f.left.to(torch::kBFloat16).to(torch::kFloat32), f.right.to(torch::kBFloat16).to(torch::kFloat32));
  for (const auto type : {torch::kChar, torch::kShort, torch::kInt}) {
    Accumulators accumulators(type, torch::kCPU, kTileBytes, torch::kBFloat16);
    torch::Tensor& target = accumulators.of("w", {kRows, kCols});
    target.copy_(torch::randint(-3, 4, {kRows, kCols}));
    const torch::Tensor expected = target.to(torch::kInt64) + (-rounded).sign().sum(0).to(torch::kInt64);
    accumulators.add_products(target, f.left, f.right);
    EXPECT_TRUE(torch::equal(target.to(torch::kInt64), expected)) << "count type " << c10::toString(type);
  }
  // Sample 1's zero row casts no vote in bfloat16 either.
  Accumulators accumulators(torch::kChar, torch::kCPU, kTileBytes, torch::kBFloat16);
  torch::Tensor& target = accumulators.of("w", {kRows, kCols});
  accumulators.add_products(target, f.left, f.right);
  EXPECT_LE(target[4].abs().max().item<int>(), kSamples - 1);
}

// Against float32 votes, a sample's vote may change only where its product is within bfloat16's
// rounding of zero: |p| <= 2^-7 * sum_k |left_k| |right_k| (each factor's relative error is at
// most 2^-9, the float32 sum's is far smaller).
TEST(SampleStatistics, Bfloat16VotesChangeOnlyWithinRoundingOfZero) {
  torch::manual_seed(11);
  constexpr int64_t kN = 6, kM = 40, kK = 96, kC = 24;
  const torch::Tensor left = torch::randn({kN, kK, kM}).transpose(1, 2), right = torch::randn({kN, kK, kC});
  const torch::Tensor exact = torch::bmm(left.to(torch::kFloat64), right.to(torch::kFloat64));
  const torch::Tensor bound = std::ldexp(1.0, -7) * torch::bmm(left.abs().to(torch::kFloat64), right.abs().to(torch::kFloat64));
  long long changed = 0;
  for (int64_t i = 0; i < kN; ++i) {
    Accumulators narrow(torch::kInt, torch::kCPU, kTileBytes, torch::kBFloat16);
    torch::Tensor& votes = narrow.of("w", {kM, kC});
    narrow.add_products(votes, left.slice(0, i, i + 1), right.slice(0, i, i + 1));
    const torch::Tensor reference = (-exact[i]).sign().to(torch::kInt);
    const torch::Tensor differs = votes.ne(reference);
    changed += differs.sum().item<int64_t>();
    EXPECT_TRUE(exact[i].abs().le(bound[i]).logical_or(differs.logical_not()).all().item<bool>()) << "sample " << i;
  }
  EXPECT_LT(changed, kN * kM * kC / 20);  // most products are far from zero
}

// A hook (a tied head's embedding rows) sees float32 tiles: bfloat16 products are widened before
// it, so what it adds is not rounded to bfloat16.
TEST(SampleStatistics, HookSeesFloat32TilesOfBfloat16Products) {
  const Factors f = make_factors();
  Accumulators accumulators(torch::kInt, torch::kCPU, kTileBytes, torch::kBFloat16);
  torch::Tensor& target = accumulators.of("w", {kRows, kCols});
  torch::Tensor rounded = torch::bmm(f.left.to(torch::kBFloat16).to(torch::kFloat32), f.right.to(torch::kBFloat16).to(torch::kFloat32));
  // A value that bfloat16 would round to zero beside the product decides the sign of entry 0.
  const float tiny = 1e-3f * rounded[0][0][0].abs().item<float>();
  accumulators.add_products(target, f.left, f.right, [&](torch::Tensor& tile, int64_t begin, int64_t) {
    EXPECT_EQ(tile.scalar_type(), torch::kFloat32);
    if (begin == 0) tile[0][0][0] = tiny;
  });
  rounded[0][0][0] = tiny;
  EXPECT_TRUE(torch::equal(target, (-rounded).sign().sum(0).to(torch::kInt)));
}

TEST(SampleStatistics, Bfloat16ProductsAreForVoteCountsOnly) {
  EXPECT_THROW(Accumulators(torch::kDouble, torch::kCPU, kTileBytes, torch::kBFloat16), Error);
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
