#include "conv_votes.hpp"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "gradfix/core/cpu_clones.hpp"

namespace gradfix {

namespace {

// The windows of one plane, compared in LibTorch's order (a later value wins if larger or NaN, so
// ties keep the first index: MNIST's blank background gives whole windows of equal values).
// `corners` holds each window's top-left index; v0..v3 are scratch of one entry per window. The
// four values are first gathered into contiguous arrays, so that the comparisons, a few
// instructions per window, run as vector selects over the whole plane.
GRADFIX_AVX2_CLONE void pool_plane(const float* plane, int64_t width, const std::vector<int32_t>& corners, float* v0, float* v1, float* v2,
                                   float* v3, float* pooled, int32_t* argmax) {
  const int64_t windows = static_cast<int64_t>(corners.size());
  for (int64_t q = 0; q < windows; ++q) {
    const float* corner = plane + corners[q];
    v0[q] = corner[0];
    v1[q] = corner[1];
    v2[q] = corner[width];
    v3[q] = corner[width + 1];
  }
  const int32_t below = static_cast<int32_t>(width);
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
    argmax[q] = corners[q] + offset;
  }
}

}  // namespace

void relu_max_pool2(const float* input, int64_t planes, int64_t height, int64_t width, float* pooled, int32_t* argmax) {
  const int64_t pooled_height = height / 2, pooled_width = width / 2, windows = pooled_height * pooled_width;
  std::vector<int32_t> corners(static_cast<std::size_t>(windows));
  for (int64_t py = 0; py < pooled_height; ++py)
    for (int64_t px = 0; px < pooled_width; ++px) corners[py * pooled_width + px] = static_cast<int32_t>(2 * py * width + 2 * px);
  std::vector<float> values(static_cast<std::size_t>(4 * windows));
  float* v = values.data();
  for (int64_t p = 0; p < planes; ++p)
    pool_plane(input + p * height * width, width, corners, v, v + windows, v + 2 * windows, v + 3 * windows, pooled + p * windows,
               argmax + p * windows);
}

namespace {

// Scratch of one thread: a sample's input with a border of zeros in channels-last order
// [height + 2][width + 2][in], the weight gradient [out][3][3][in] and, when wanted, the input
// gradient in the input's padded layout. Channels-last puts the three taps of a kernel row next to
// each other for every channel, so each (position, kernel row) is one contiguous run of 3 * in.
struct SampleScratch {
  std::vector<float> padded, weight_gradient, padded_input_gradient;
};

inline void add_scaled(float* target, const float* source, float scale, int64_t count) {
  for (int64_t k = 0; k < count; ++k) target[k] += scale * source[k];
}

// `corner_of` maps a pixel's flat index (y * width + x) to where its 3x3 window starts in the
// padded copy: rows y..y+2 and columns x..x+2 there.
GRADFIX_AVX2_CLONE void one_sample(const ConvBlockShape& shape, const float* input, const float* pooled_gradient, const int32_t* argmax,
                                   const int32_t* corner_of, const float* weight_taps_last, int32_t* votes, float* input_gradient,
                                   SampleScratch& scratch) {
  const int64_t in = shape.in_channels, out = shape.out_channels, height = shape.height, width = shape.width;
  const int64_t row = (width + 2) * in, run = 3 * in, taps = 9 * in;
  const int64_t pooled_size = shape.pooled_height() * shape.pooled_width();
  std::fill(scratch.padded.begin(), scratch.padded.end(), 0.0f);
  for (int64_t y = 0; y < height; ++y)
    for (int64_t x = 0; x < width; ++x)
      for (int64_t c = 0; c < in; ++c) scratch.padded[(y + 1) * row + (x + 1) * in + c] = input[(c * height + y) * width + x];
  std::fill(scratch.weight_gradient.begin(), scratch.weight_gradient.end(), 0.0f);
  if (input_gradient) std::fill(scratch.padded_input_gradient.begin(), scratch.padded_input_gradient.end(), 0.0f);
  for (int64_t o = 0; o < out; ++o) {
    float* gradient = scratch.weight_gradient.data() + o * taps;
    const float* g = pooled_gradient + o * pooled_size;
    const int32_t* position = argmax + o * pooled_size;
    if (in == 1 && !input_gradient) {
      // One input channel (the first block of a grey-scale CNN): a window is 3 runs of 3, too
      // short for vectors, so its nine sums stay in registers across the positions instead.
      float sums[9] = {};
      for (int64_t q = 0; q < pooled_size; ++q) {
        const float scale = g[q];
        const float* window = scratch.padded.data() + corner_of[position[q]];
        for (int64_t dy = 0; dy < 3; ++dy)
          for (int64_t dx = 0; dx < 3; ++dx) sums[dy * 3 + dx] += scale * window[dy * row + dx];
      }
      std::copy(sums, sums + 9, gradient);
      continue;
    }
    for (int64_t q = 0; q < pooled_size; ++q) {
      const float scale = g[q];
      if (scale == 0.0f) continue;  // a window whose max the ReLU cut, or no gradient: nothing flows
      const int64_t corner = corner_of[position[q]];
      for (int64_t dy = 0; dy < 3; ++dy) {
        add_scaled(gradient + dy * run, scratch.padded.data() + corner + dy * row, scale, run);
        if (input_gradient)
          add_scaled(scratch.padded_input_gradient.data() + corner + dy * row, weight_taps_last + o * taps + dy * run, scale, run);
      }
    }
  }
  // A descent vote: -sign(gradient), none where the gradient is exactly 0. In the scratch's order
  // [out][3][3][in]; conv3x3_votes puts the thread's sums in the weight's order once at the end.
  for (int64_t i = 0; i < out * taps; ++i) {
    const float value = scratch.weight_gradient[i];
    votes[i] -= static_cast<int32_t>(value > 0.0f) - static_cast<int32_t>(value < 0.0f);
  }
  if (input_gradient)
    for (int64_t c = 0; c < in; ++c)
      for (int64_t y = 0; y < height; ++y)
        for (int64_t x = 0; x < width; ++x)
          input_gradient[(c * height + y) * width + x] = scratch.padded_input_gradient[(y + 1) * row + (x + 1) * in + c];
}

}  // namespace

void conv3x3_votes(const ConvBlockShape& shape, int64_t samples, const float* input, const float* pooled_gradient,
                   const int32_t* argmax, const float* weight, int32_t* votes, float* input_gradient) {
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
    scratch.padded.resize(static_cast<std::size_t>((shape.height + 2) * (shape.width + 2) * in));
    scratch.weight_gradient.resize(static_cast<std::size_t>(out * taps));
    if (input_gradient) scratch.padded_input_gradient.resize(scratch.padded.size());
    std::vector<int32_t> local(static_cast<std::size_t>(out * taps), 0);
    for (int64_t n = begin; n < end; ++n)
      one_sample(shape, input + n * input_size, pooled_gradient + n * pooled_size, argmax + n * pooled_size, corner_of.data(), weight_taps_last.data(),
                 local.data(), input_gradient ? input_gradient + n * input_size : nullptr, scratch);
    const std::lock_guard<std::mutex> lock(merge);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t c = 0; c < in; ++c)
        for (int64_t t = 0; t < 9; ++t) votes[(o * in + c) * 9 + t] += local[o * taps + t * in + c];
  });
}

}  // namespace gradfix
