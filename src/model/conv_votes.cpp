#include "conv_votes.hpp"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include "gradfix/io/cpu_clones.hpp"

namespace gradfix {

namespace {

// The windows of one plane, compared in LibTorch's order (a later value wins if larger or NaN, so
// ties keep the first index: MNIST's blank background gives whole windows of equal values).
// Window q starts at read_corners[q] (rows `stride` apart) and its argmax is index_corners[q]
// plus the winner's offset (`below` for the lower row). v0..v3 are scratch of one entry per
// window: the four values are first gathered into contiguous arrays, so that the comparisons, a
// few instructions per window, run as vector selects over the whole plane.
GRADFIX_AVX2_CLONE void pool_plane(const float* plane, int64_t stride, int32_t below, const std::vector<int32_t>& read_corners,
                                   const std::vector<int32_t>& index_corners, float* v0, float* v1, float* v2, float* v3, float* pooled,
                                   int32_t* argmax) {
  const int64_t windows = static_cast<int64_t>(read_corners.size());
  for (int64_t q = 0; q < windows; ++q) {
    const float* corner = plane + read_corners[q];
    v0[q] = corner[0];
    v1[q] = corner[1];
    v2[q] = corner[stride];
    v3[q] = corner[stride + 1];
  }
  for (int64_t q = 0; q < windows; ++q) {
    float best = v0[q];
    int32_t offset = 0;
    const bool take1 = v1[q] > best || v1[q] != v1[q];
    best = take1 ? v1[q] : best;
    offset = take1 ? 1 : offset;
    const bool take2 = v2[q] > best || v2[q] != v2[q];
    best = take2 ? v2[q] : best;
    offset = take2 ? below : offset;
    const bool take3 = v3[q] > best || v3[q] != v3[q];
    best = take3 ? v3[q] : best;
    offset = take3 ? below + 1 : offset;
    pooled[q] = (best > 0.0f || best != best) ? best : 0.0f;
    argmax[q] = index_corners[q] + offset;
  }
}

// Pools planes of one size, read with rows `stride` apart (>= width): the windows' corners once,
// scratch for their values. argmax is a flat index y * width + x either way.
class PlanePooler {
 public:
  PlanePooler(int64_t height, int64_t width, int64_t stride) : stride_(stride) {
    const int64_t pooled_height = height / 2, pooled_width = width / 2;
    for (int64_t py = 0; py < pooled_height; ++py)
      for (int64_t px = 0; px < pooled_width; ++px) {
        read_corners_.push_back(static_cast<int32_t>(2 * py * stride + 2 * px));
        index_corners_.push_back(static_cast<int32_t>(2 * py * width + 2 * px));
      }
    values_.resize(4 * read_corners_.size());
    below_ = static_cast<int32_t>(width);
  }
  void pool(const float* plane, float* pooled, int32_t* argmax) {
    const std::size_t windows = read_corners_.size();
    float* v = values_.data();
    pool_plane(plane, stride_, below_, read_corners_, index_corners_, v, v + windows, v + 2 * windows, v + 3 * windows, pooled, argmax);
  }

 private:
  int64_t stride_;
  int32_t below_ = 0;
  std::vector<int32_t> read_corners_, index_corners_;
  std::vector<float> values_;
};

// Eight and four floats in vector registers: GCC and Clang lower Float8 to two SSE registers in
// the baseline build and one AVX register in the AVX2 clone, Float4 to one SSE register.
typedef float Float8 __attribute__((vector_size(32)));
typedef float Float4 __attribute__((vector_size(16)));

// One output channel's plane of a convolution with one input channel, rows `stride` apart (a
// multiple of 16, >= width), from the input padded with zeros (rows stride + 2 apart, so that whole
// blocks of 16 can be read). Each block of 16 outputs stays in registers across the nine taps.
GRADFIX_AVX2_CLONE void one_channel_plane(const float* padded, int64_t stride, int64_t height, const float* kernel, float bias, float* plane) {
  for (int64_t y = 0; y < height; ++y)
    for (int64_t x0 = 0; x0 < stride; x0 += 16) {
      Float8 low = Float8{} + bias, high = low;
      for (int64_t dy = 0; dy < 3; ++dy)
        for (int64_t dx = 0; dx < 3; ++dx) {
          const float tap = kernel[dy * 3 + dx];
          const float* source = padded + (y + dy) * (stride + 2) + x0 + dx;
          Float8 first, second;
          std::memcpy(&first, source, sizeof first);
          std::memcpy(&second, source + 8, sizeof second);
          low += tap * first;
          high += tap * second;
        }
      std::memcpy(plane + y * stride + x0, &low, sizeof low);
      std::memcpy(plane + y * stride + x0 + 8, &high, sizeof high);
    }
}

}  // namespace

void relu_max_pool2(const float* input, int64_t planes, int64_t height, int64_t width, float* pooled, int32_t* argmax) {
  PlanePooler pooler(height, width, width);
  const int64_t windows = (height / 2) * (width / 2);
  for (int64_t p = 0; p < planes; ++p) pooler.pool(input + p * height * width, pooled + p * windows, argmax + p * windows);
}

void conv3x3_relu_max_pool2_one_channel(const float* input, int64_t samples, int64_t height, int64_t width, const float* weight,
                                        const float* bias, int64_t out, float* pooled, int32_t* argmax) {
  const int64_t stride = (width + 15) / 16 * 16, windows = (height / 2) * (width / 2);
  at::parallel_for(0, samples, 1, [&](int64_t begin, int64_t end) {
    PlanePooler pooler(height, width, stride);
    std::vector<float> padded(static_cast<std::size_t>((height + 2) * (stride + 2)), 0.0f), plane(static_cast<std::size_t>(height * stride));
    for (int64_t n = begin; n < end; ++n) {
      // The border and the columns beyond the image stay 0 from the start.
      for (int64_t y = 0; y < height; ++y)
        std::copy(input + (n * height + y) * width, input + (n * height + y + 1) * width, padded.begin() + (y + 1) * (stride + 2) + 1);
      for (int64_t o = 0; o < out; ++o) {
        one_channel_plane(padded.data(), stride, height, weight + o * 9, bias[o], plane.data());
        pooler.pool(plane.data(), pooled + (n * out + o) * windows, argmax + (n * out + o) * windows);
      }
    }
  });
}

namespace {

// Scratch of one thread: a sample's input with a border of zeros in channels-last order
// [height + 2][width + 2][in], the weight gradient [out][3][3][in], when wanted the input gradient
// in the input's padded layout, and one output channel's windows that carry a gradient (their
// gradient and where their 3x3 window starts in the padded copy). Channels-last puts the three
// taps of a kernel row next to each other for every channel, so each (window, kernel row) is one
// contiguous run of 3 * in.
struct SampleScratch {
  std::vector<float> padded, weight_gradient, padded_input_gradient, scales;
  std::vector<int32_t> corners;
};

inline void add_scaled(float* target, const float* source, float scale, int64_t count) {
  for (int64_t k = 0; k < count; ++k) target[k] += scale * source[k];
}

// target[0 .. 8 * kVectors) = sum_k scales[k] * source[corners[k] + 0 ..], in registers across
// the windows k and in the order of k (the order of the scalar loop that handles the rest).
template <int kVectors>
inline void sum_windows(const float* source, const int32_t* corners, const float* scales, int64_t count, float* target) {
  Float8 sums[kVectors] = {};
  for (int64_t k = 0; k < count; ++k) {
    const float* from = source + corners[k];
    for (int v = 0; v < kVectors; ++v) {
      Float8 values;
      std::memcpy(&values, from + 8 * v, sizeof values);
      sums[v] += scales[k] * values;
    }
  }
  std::memcpy(target, sums, sizeof sums);
}

// `corner_of` maps a pixel's flat index (y * width + x) to where its 3x3 window starts in the
// padded copy: rows y..y+2 and columns x..x+2 there.
GRADFIX_AVX2_CLONE void one_sample(const ConvBlockShape& shape, const ConvBlockSample& sample, const int32_t* corner_of,
                                   const float* weight_taps_last, double cancellation_tolerance, int32_t* weight_votes,
                                   int32_t* bias_votes, SampleScratch& scratch) {
  const int64_t in = shape.in_channels, out = shape.out_channels, height = shape.height, width = shape.width;
  const int64_t row = (width + 2) * in, run = 3 * in, taps = 9 * in;
  const int64_t pooled_size = shape.pooled_height() * shape.pooled_width();
  std::fill(scratch.padded.begin(), scratch.padded.end(), 0.0f);
  for (int64_t y = 0; y < height; ++y)
    for (int64_t x = 0; x < width; ++x)
      for (int64_t c = 0; c < in; ++c) scratch.padded[(y + 1) * row + (x + 1) * in + c] = sample.input[(c * height + y) * width + x];
  if (sample.input_gradient) std::fill(scratch.padded_input_gradient.begin(), scratch.padded_input_gradient.end(), 0.0f);
  float* scales = scratch.scales.data();
  int32_t* corners = scratch.corners.data();
  for (int64_t o = 0; o < out; ++o) {
    // The ReLU passes a gradient only where the pooled value is positive (a NaN passes none).
    // The windows that pass one are gathered first; the bias's gradient is their sum.
    const float* pooled = sample.pooled + o * pooled_size;
    const float* g = sample.pooled_gradient + o * pooled_size;
    const int32_t* position = sample.argmax + o * pooled_size;
    int64_t count = 0;
    double sum = 0.0, magnitude = 0.0;
    for (int64_t q = 0; q < pooled_size; ++q) {
      // Without a branch: which windows pass is as good as random, and mispredictions cost more
      // than writing every window and advancing only past those that pass.
      const bool passes = (pooled[q] > 0.0f) & (g[q] != 0.0f);
      const float value = passes ? g[q] : 0.0f;
      sum += value;
      magnitude += std::fabs(value);
      scales[count] = value;
      corners[count] = corner_of[position[q]];
      count += passes;
    }
    if (std::fabs(sum) > magnitude * cancellation_tolerance) bias_votes[o] -= sum > 0.0 ? 1 : -1;
    float* gradient = scratch.weight_gradient.data() + o * taps;
    if (in == 1) {
      // One input channel (the first block of a grey-scale CNN): a kernel row is 3 taps, so each
      // is summed in a 4-lane register whose last lane (the next pixel, read from the scratch's
      // slack) is thrown away.
      Float4 sums[3] = {};
      for (int64_t k = 0; k < count; ++k) {
        const float* window = scratch.padded.data() + corners[k];
        for (int64_t dy = 0; dy < 3; ++dy) {
          Float4 values;
          std::memcpy(&values, window + dy * row, sizeof values);
          sums[dy] += scales[k] * values;
        }
      }
      for (int64_t dy = 0; dy < 3; ++dy)
        for (int64_t dx = 0; dx < 3; ++dx) gradient[dy * 3 + dx] = sums[dy][dx];
    } else {
      for (int64_t dy = 0; dy < 3; ++dy) {
        const float* rows = scratch.padded.data() + dy * row;
        int64_t start = 0;
        for (; start + 32 <= run; start += 32) sum_windows<4>(rows + start, corners, scales, count, gradient + dy * run + start);
        for (; start + 8 <= run; start += 8) sum_windows<1>(rows + start, corners, scales, count, gradient + dy * run + start);
        for (; start < run; ++start) {
          float total = 0.0f;
          for (int64_t k = 0; k < count; ++k) total += scales[k] * rows[corners[k] + start];
          gradient[dy * run + start] = total;
        }
      }
    }
    if (sample.input_gradient)
      for (int64_t k = 0; k < count; ++k)
        for (int64_t dy = 0; dy < 3; ++dy)
          add_scaled(scratch.padded_input_gradient.data() + corners[k] + dy * row, weight_taps_last + o * taps + dy * run, scales[k], run);
  }
  // A descent vote: -sign(gradient), none where the gradient is exactly 0. In the scratch's order
  // [out][3][3][in]; conv3x3_votes puts the thread's sums in the weight's order once at the end.
  for (int64_t i = 0; i < out * taps; ++i) {
    const float value = scratch.weight_gradient[i];
    weight_votes[i] -= static_cast<int32_t>(value > 0.0f) - static_cast<int32_t>(value < 0.0f);
  }
  if (sample.input_gradient)
    for (int64_t c = 0; c < in; ++c)
      for (int64_t y = 0; y < height; ++y)
        for (int64_t x = 0; x < width; ++x)
          sample.input_gradient[(c * height + y) * width + x] = scratch.padded_input_gradient[(y + 1) * row + (x + 1) * in + c];
}

}  // namespace

void conv3x3_votes(const ConvBlockShape& shape, int64_t samples, const ConvBlockSample& first, const float* weight,
                   double cancellation_tolerance, int32_t* weight_votes, int32_t* bias_votes) {
  const int64_t in = shape.in_channels, out = shape.out_channels, taps = 9 * in;
  const int64_t input_size = in * shape.height * shape.width, pooled_size = out * shape.pooled_height() * shape.pooled_width();
  // The weight as [out][3][3][in], the order of a padded channels-last window.
  std::vector<float> weight_taps_last(static_cast<std::size_t>(out * taps));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t c = 0; c < in; ++c)
      for (int64_t t = 0; t < 9; ++t) weight_taps_last[o * taps + t * in + c] = weight[(o * in + c) * 9 + t];
  std::vector<int32_t> corner_of(static_cast<std::size_t>(shape.height * shape.width));
  for (int64_t y = 0; y < shape.height; ++y)
    for (int64_t x = 0; x < shape.width; ++x) corner_of[y * shape.width + x] = static_cast<int32_t>((y * (shape.width + 2) + x) * in);
  std::mutex merge;
  // Vote counts are integers, so the sum over threads is the same in any order.
  at::parallel_for(0, samples, 1, [&](int64_t begin, int64_t end) {
    SampleScratch scratch;
    // One float of slack past the last window's row for the one-channel path's 4-lane reads.
    scratch.padded.resize(static_cast<std::size_t>((shape.height + 2) * (shape.width + 2) * in + 1));
    scratch.weight_gradient.resize(static_cast<std::size_t>(out * taps));
    if (first.input_gradient) scratch.padded_input_gradient.resize(scratch.padded.size());
    scratch.scales.resize(static_cast<std::size_t>(shape.pooled_height() * shape.pooled_width()));
    scratch.corners.resize(scratch.scales.size());
    std::vector<int32_t> local_weight(static_cast<std::size_t>(out * taps), 0), local_bias(static_cast<std::size_t>(out), 0);
    for (int64_t n = begin; n < end; ++n) {
      const ConvBlockSample sample{first.input + n * input_size, first.pooled + n * pooled_size, first.pooled_gradient + n * pooled_size,
                                   first.argmax + n * pooled_size, first.input_gradient ? first.input_gradient + n * input_size : nullptr};
      one_sample(shape, sample, corner_of.data(), weight_taps_last.data(), cancellation_tolerance, local_weight.data(), local_bias.data(),
                 scratch);
    }
    const std::lock_guard<std::mutex> lock(merge);
    for (int64_t o = 0; o < out; ++o) {
      bias_votes[o] += local_bias[o];
      for (int64_t c = 0; c < in; ++c)
        for (int64_t t = 0; t < 9; ++t) weight_votes[(o * in + c) * 9 + t] += local_weight[o * taps + t * in + c];
    }
  });
}

}  // namespace gradfix
