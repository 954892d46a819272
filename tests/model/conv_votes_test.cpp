// The CNN's vote kernels (src/model/conv_votes.hpp): pooling against a hand-checked case and
// LibTorch, the per-sample votes and input gradients against a brute-force convolution written
// from the definition. Values are small integers, so float sums are exact in any order and the
// comparisons are exact.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cmath>
#include <random>
#include <vector>

#include "../../src/model/conv_votes.hpp"

namespace gradfix {
namespace {

TEST(ReluMaxPool2, HandCheckedWindowsTiesNegativesNanAndOddEdges) {
  // Plane 0 is 3x5: the last row and column are dropped. Plane 1 is 3x5 too, with a NaN.
  const float nan = std::nanf("");
  const std::vector<float> input = {1, 3, -1, -2, 7,   //
                                    3, 2, -3, -4, 8,   //
                                    9, 9, 9, 9, 9,     //
                                    1, nan, 0, 0, 0,   //
                                    5, 2, 0, -1, 0,    //
                                    0, 0, 0, 0, 0};
  std::vector<float> pooled(4);
  std::vector<int32_t> argmax(4);
  relu_max_pool2(input.data(), 2, 3, 5, pooled.data(), argmax.data());
  // Window (0,0) of plane 0: 1 3 / 3 2, ties keep the first 3 (index 1). Window (0,1): all
  // negative, the ReLU gives 0 and the first largest is -1 (index 2).
  EXPECT_EQ(pooled[0], 3.0f);
  EXPECT_EQ(argmax[0], 1);
  EXPECT_EQ(pooled[1], 0.0f);
  EXPECT_EQ(argmax[1], 2);
  // Plane 1, window (0,0): the NaN wins and stays. Window (0,1): 0 0 / 0 -1, the first 0.
  EXPECT_TRUE(std::isnan(pooled[2]));
  EXPECT_EQ(argmax[2], 1);
  EXPECT_EQ(pooled[3], 0.0f);
  EXPECT_EQ(argmax[3], 2);
}

TEST(ReluMaxPool2, AgreesWithLibTorch) {
  torch::manual_seed(5);
  // Rounded values make ties common; LibTorch pools the ReLU's output, whose ties among
  // non-positive values pick another index, so the indices are compared where the max is positive.
  const torch::Tensor z = torch::round(torch::randn({3, 4, 9, 7}) * 2);
  const auto [expected, expected_index] = torch::max_pool2d_with_indices(torch::relu(z), 2);
  torch::Tensor pooled = torch::empty_like(expected);
  torch::Tensor argmax = torch::empty(expected.sizes(), torch::kInt32);
  relu_max_pool2(z.data_ptr<float>(), 12, 9, 7, pooled.data_ptr<float>(), argmax.data_ptr<int32_t>());
  EXPECT_TRUE(pooled.equal(expected));
  const torch::Tensor positive = expected.gt(0);
  EXPECT_TRUE(argmax.to(torch::kInt64).masked_select(positive).equal(expected_index.masked_select(positive)));
  EXPECT_GT(positive.sum().item<int64_t>(), 50);
}

// The definition: the pooled gradient placed at its argmax gives the convolution's output
// gradient delta[o][y][x]; G[o][c][dy][dx] = sum_{y,x} delta[o][y][x] in[c][y+dy-1][x+dx-1] and
// the input gradient is sum_{o,dy,dx} delta[o][y][x] w[o][c][dy][dx] at (y+dy-1, x+dx-1).
void brute_force(const ConvBlockShape& s, int64_t samples, const std::vector<float>& input, const std::vector<float>& pooled_gradient,
                 const std::vector<int32_t>& argmax, const std::vector<float>& weight, std::vector<int32_t>& votes,
                 std::vector<float>& input_gradient) {
  const int64_t pooled_size = s.pooled_height() * s.pooled_width(), plane = s.height * s.width;
  for (int64_t n = 0; n < samples; ++n) {
    std::vector<float> delta(s.out_channels * plane, 0.0f);
    for (int64_t o = 0; o < s.out_channels; ++o)
      for (int64_t q = 0; q < pooled_size; ++q)
        delta[o * plane + argmax[(n * s.out_channels + o) * pooled_size + q]] += pooled_gradient[(n * s.out_channels + o) * pooled_size + q];
    for (int64_t o = 0; o < s.out_channels; ++o)
      for (int64_t c = 0; c < s.in_channels; ++c)
        for (int64_t dy = 0; dy < 3; ++dy)
          for (int64_t dx = 0; dx < 3; ++dx) {
            float g = 0.0f;
            for (int64_t y = 0; y < s.height; ++y)
              for (int64_t x = 0; x < s.width; ++x) {
                const int64_t yy = y + dy - 1, xx = x + dx - 1;
                if (yy < 0 || yy >= s.height || xx < 0 || xx >= s.width) continue;
                const float d = delta[o * plane + y * s.width + x];
                g += d * input[((n * s.in_channels + c) * s.height + yy) * s.width + xx];
                input_gradient[((n * s.in_channels + c) * s.height + yy) * s.width + xx] += d * weight[((o * s.in_channels + c) * 3 + dy) * 3 + dx];
              }
            votes[((o * s.in_channels + c) * 3 + dy) * 3 + dx] -= (g > 0) - (g < 0);
          }
  }
}

TEST(Conv3x3Votes, EqualTheDefinitionOnExactValues) {
  std::mt19937 random(11);
  std::uniform_int_distribution<int> value(-3, 3), offset(0, 1);
  const int threads_before = torch::get_num_threads();
  for (const ConvBlockShape shape : {ConvBlockShape{2, 3, 5, 4}, ConvBlockShape{1, 4, 6, 7}, ConvBlockShape{3, 2, 2, 2}}) {
    for (int threads : {1, 2}) {
      torch::set_num_threads(threads);
      const int64_t samples = 5, pooled_size = shape.pooled_height() * shape.pooled_width();
      std::vector<float> input(samples * shape.in_channels * shape.height * shape.width), weight(shape.out_channels * shape.in_channels * 9),
          pooled_gradient(samples * shape.out_channels * pooled_size);
      std::vector<int32_t> argmax(pooled_gradient.size());
      for (float& v : input) v = static_cast<float>(value(random));
      for (float& v : weight) v = static_cast<float>(value(random));
      for (float& v : pooled_gradient) v = static_cast<float>(value(random));  // about one in seven is 0
      for (std::size_t i = 0; i < argmax.size(); ++i) {
        const int64_t q = static_cast<int64_t>(i) % pooled_size, py = q / shape.pooled_width(), px = q % shape.pooled_width();
        argmax[i] = static_cast<int32_t>((2 * py + offset(random)) * shape.width + 2 * px + offset(random));
      }
      std::vector<int32_t> votes(weight.size(), 7), expected_votes(weight.size(), 7);  // votes are added to what is there
      std::vector<float> input_gradient(input.size(), -1.0f), expected_gradient(input.size(), 0.0f);
      conv3x3_votes(shape, samples, input.data(), pooled_gradient.data(), argmax.data(), weight.data(), votes.data(), input_gradient.data());
      brute_force(shape, samples, input, pooled_gradient, argmax, weight, expected_votes, expected_gradient);
      EXPECT_EQ(votes, expected_votes) << "in " << shape.in_channels << " out " << shape.out_channels << " threads " << threads;
      EXPECT_EQ(input_gradient, expected_gradient) << "in " << shape.in_channels << " out " << shape.out_channels << " threads " << threads;
      // The first block has no input gradient to form: the votes alone must be the same.
      std::vector<int32_t> votes_only(weight.size(), 7);
      conv3x3_votes(shape, samples, input.data(), pooled_gradient.data(), argmax.data(), weight.data(), votes_only.data(), nullptr);
      EXPECT_EQ(votes_only, expected_votes);
      // Votes must have been cast, or the comparison proves little.
      long long unchanged = 0;
      for (int32_t v : expected_votes) unchanged += v == 7;
      EXPECT_LT(unchanged, static_cast<long long>(expected_votes.size()));
    }
  }
  torch::set_num_threads(threads_before);
}

}  // namespace
}  // namespace gradfix
