// The CNN's vote kernels (src/model/conv_votes.hpp): pooling against a hand-checked case and
// LibTorch, the fused one-channel block against LibTorch, the per-sample votes and input
// gradients against a brute-force convolution written from the definition. Values are small
// integers, so float sums are exact in any order and the comparisons are exact.
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

// The fused first block against LibTorch's convolution, ReLU and pooling. Small integers make
// every sum exact and ties frequent, so the tie order is checked too; a width of 19 is more than
// one block of 16 and odd, a height of 7 odd.
TEST(Conv3x3ReluMaxPool2OneChannel, EqualsLibTorch) {
  torch::manual_seed(8);
  const int threads_before = torch::get_num_threads();
  for (int threads : {1, 2}) {
    torch::set_num_threads(threads);
    const torch::Tensor input = torch::randint(-3, 4, {3, 1, 7, 19}).to(torch::kFloat32);
    const torch::Tensor weight = torch::randint(-2, 3, {4, 1, 3, 3}).to(torch::kFloat32), bias = torch::randint(-2, 3, {4}).to(torch::kFloat32);
    const auto [expected, expected_index] = torch::max_pool2d_with_indices(torch::relu(torch::conv2d(input, weight, bias, 1, 1)), 2);
    torch::Tensor pooled = torch::empty_like(expected);
    torch::Tensor argmax = torch::empty(expected.sizes(), torch::kInt32);
    conv3x3_relu_max_pool2_one_channel(input.data_ptr<float>(), 3, 7, 19, weight.data_ptr<float>(), bias.data_ptr<float>(), 4,
                                       pooled.data_ptr<float>(), argmax.data_ptr<int32_t>());
    EXPECT_TRUE(pooled.equal(expected)) << "threads " << threads;
    const torch::Tensor positive = expected.gt(0);
    EXPECT_TRUE(argmax.to(torch::kInt64).masked_select(positive).equal(expected_index.masked_select(positive))) << "threads " << threads;
    EXPECT_GT(positive.sum().item<int64_t>(), 20);
  }
  torch::set_num_threads(threads_before);
}

// In channels 16 make a kernel row 48 taps long: blocks of 32 and 8 summed in registers.
// The definition: the gradient at a pooled output passes the ReLU where the pooled value is
// positive and lands at the window's argmax, giving the convolution's output gradient
// delta[o][y][x]; G[o][c][dy][dx] = sum_{y,x} delta[o][y][x] in[c][y+dy-1][x+dx-1], the bias's
// gradient is sum_{y,x} delta[o][y][x], and the input gradient is sum_{o,dy,dx} delta[o][y][x]
// w[o][c][dy][dx] at (y+dy-1, x+dx-1).
struct Votes {
  std::vector<int32_t> weight, bias;
  std::vector<float> input_gradient;
};

Votes brute_force(const ConvBlockShape& s, int64_t samples, const std::vector<float>& input, const std::vector<float>& pooled,
                  const std::vector<float>& pooled_gradient, const std::vector<int32_t>& argmax, const std::vector<float>& weight) {
  const int64_t pooled_size = s.pooled_height() * s.pooled_width(), plane = s.height * s.width;
  Votes votes{std::vector<int32_t>(weight.size(), 0), std::vector<int32_t>(s.out_channels, 0), std::vector<float>(input.size(), 0.0f)};
  for (int64_t n = 0; n < samples; ++n) {
    std::vector<float> delta(s.out_channels * plane, 0.0f);
    for (int64_t o = 0; o < s.out_channels; ++o)
      for (int64_t q = 0; q < pooled_size; ++q) {
        const int64_t at = (n * s.out_channels + o) * pooled_size + q;
        if (pooled[at] > 0) delta[o * plane + argmax[at]] += pooled_gradient[at];
      }
    for (int64_t o = 0; o < s.out_channels; ++o) {
      float b = 0.0f;
      for (int64_t p = 0; p < plane; ++p) b += delta[o * plane + p];
      votes.bias[o] -= (b > 0) - (b < 0);
      for (int64_t c = 0; c < s.in_channels; ++c)
        for (int64_t dy = 0; dy < 3; ++dy)
          for (int64_t dx = 0; dx < 3; ++dx) {
            float g = 0.0f;
            for (int64_t y = 0; y < s.height; ++y)
              for (int64_t x = 0; x < s.width; ++x) {
                const int64_t yy = y + dy - 1, xx = x + dx - 1;
                if (yy < 0 || yy >= s.height || xx < 0 || xx >= s.width) continue;
                const float d = delta[o * plane + y * s.width + x];
                const int64_t at = ((n * s.in_channels + c) * s.height + yy) * s.width + xx;
                g += d * input[at];
                votes.input_gradient[at] += d * weight[((o * s.in_channels + c) * 3 + dy) * 3 + dx];
              }
            votes.weight[((o * s.in_channels + c) * 3 + dy) * 3 + dx] -= (g > 0) - (g < 0);
          }
    }
  }
  return votes;
}

TEST(Conv3x3Votes, EqualTheDefinitionOnExactValues) {
  std::mt19937 random(11);
  std::uniform_int_distribution<int> value(-3, 3), offset(0, 1);
  const int threads_before = torch::get_num_threads();
  for (const ConvBlockShape shape : {ConvBlockShape{2, 3, 5, 4}, ConvBlockShape{1, 4, 6, 7}, ConvBlockShape{3, 2, 2, 2}, ConvBlockShape{16, 3, 4, 6}}) {
    for (int threads : {1, 2}) {
      torch::set_num_threads(threads);
      const int64_t samples = 5, pooled_size = shape.pooled_height() * shape.pooled_width();
      std::vector<float> input(samples * shape.in_channels * shape.height * shape.width), weight(shape.out_channels * shape.in_channels * 9),
          pooled(samples * shape.out_channels * pooled_size), pooled_gradient(pooled.size());
      std::vector<int32_t> argmax(pooled.size());
      for (float& v : input) v = static_cast<float>(value(random));
      for (float& v : weight) v = static_cast<float>(value(random));
      for (float& v : pooled) v = static_cast<float>(value(random));           // the ReLU cuts about half
      for (float& v : pooled_gradient) v = static_cast<float>(value(random));  // about one in seven is 0
      for (std::size_t i = 0; i < argmax.size(); ++i) {
        const int64_t q = static_cast<int64_t>(i) % pooled_size, py = q / shape.pooled_width(), px = q % shape.pooled_width();
        argmax[i] = static_cast<int32_t>((2 * py + offset(random)) * shape.width + 2 * px + offset(random));
      }
      const Votes expected = brute_force(shape, samples, input, pooled, pooled_gradient, argmax, weight);
      // Votes are added to what is there.
      std::vector<int32_t> weight_votes(weight.size(), 7), bias_votes(shape.out_channels, -7);
      std::vector<float> input_gradient(input.size(), -1.0f);
      conv3x3_votes(shape, samples, {input.data(), pooled.data(), pooled_gradient.data(), argmax.data(), input_gradient.data()}, weight.data(),
                    1e-5, weight_votes.data(), bias_votes.data());
      for (std::size_t i = 0; i < weight_votes.size(); ++i) EXPECT_EQ(weight_votes[i] - 7, expected.weight[i]) << "weight " << i;
      for (std::size_t i = 0; i < bias_votes.size(); ++i) EXPECT_EQ(bias_votes[i] + 7, expected.bias[i]) << "bias " << i;
      EXPECT_EQ(input_gradient, expected.input_gradient) << "in " << shape.in_channels << " out " << shape.out_channels << " threads " << threads;
      // The first block has no input gradient to form: the votes alone must be the same.
      std::vector<int32_t> weight_only(weight.size(), 0), bias_only(shape.out_channels, 0);
      conv3x3_votes(shape, samples, {input.data(), pooled.data(), pooled_gradient.data(), argmax.data(), nullptr}, weight.data(), 1e-5,
                    weight_only.data(), bias_only.data());
      EXPECT_EQ(weight_only, expected.weight);
      EXPECT_EQ(bias_only, expected.bias);
      // Votes must have been cast, or the comparison proves little.
      long long cast = 0;
      for (int32_t v : expected.weight) cast += v != 0;
      EXPECT_GT(cast, 0);
    }
  }
  torch::set_num_threads(threads_before);
}

// A bias whose per-sample gradient cancels to within the tolerance casts no vote: +1 and -1 at two
// windows of one sample sum to exactly 0, and 1 and -(1 - 1e-7) to within 1e-6 of their size.
TEST(Conv3x3Votes, CancelledBiasSumsCastNoVote) {
  const ConvBlockShape shape{1, 1, 2, 4};  // one output channel, two windows
  const std::vector<float> input = {1, 2, 3, 4, 5, 6, 7, 8}, weight = {1, 1, 1, 1, 1, 1, 1, 1, 1}, pooled = {1, 1};
  const std::vector<int32_t> argmax = {0, 2};
  for (const float second : {-1.0f, -0.9999999f, -0.5f}) {
    const std::vector<float> pooled_gradient = {1.0f, second};
    std::vector<int32_t> weight_votes(9, 0), bias_votes(1, 0);
    conv3x3_votes(shape, 1, {input.data(), pooled.data(), pooled_gradient.data(), argmax.data(), nullptr}, weight.data(), 1e-5,
                  weight_votes.data(), bias_votes.data());
    EXPECT_EQ(bias_votes[0], second == -0.5f ? -1 : 0) << second;
  }
}

}  // namespace
}  // namespace gradfix
