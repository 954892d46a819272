#pragma once

// Per-sample sign votes of a 3x3 convolution block (padding 1, then ReLU and 2x2 max-pooling), as
// the built-in CNN has them, from one batched forward pass. Pure functions over raw float
// buffers, so that they can be checked against a brute-force reference on hand-made cases.
//
// Why this formulation: after 2x2 max-pooling at most one position of each window carries a
// gradient, so a sample's weight gradient G[o, c, dy, dx] = sum_q g[o, q] x[c, y_q + dy - 1,
// x_q + dx - 1] runs over the pooled positions q (a quarter of the pixels) at the argmax (y_q, x_q)
// of each window. Summing the products densely over every pixel, as a batched product of the
// output gradients and the unfolded inputs does, spends three quarters of its work on zeros; the
// same holds for the gradient that flows back into the block's input.

#include <cstdint>

namespace gradfix {

struct ConvBlockShape {
  int64_t in_channels = 0, out_channels = 0;
  int64_t height = 0, width = 0;  // of the block's input and of the convolution's output
  int64_t pooled_height() const { return height / 2; }
  int64_t pooled_width() const { return width / 2; }
};

// ReLU then 2x2 max-pooling (stride 2; an odd last row or column is dropped, as LibTorch does) of
// `planes` planes of height x width: pooled = max(0, window's max), argmax = the flat index
// (y * width + x) of the window's first largest value (a NaN counts as largest, as in LibTorch).
// Where the window's max is <= 0 the ReLU's gradient is 0, so which index is kept does not matter.
void relu_max_pool2(const float* input, int64_t planes, int64_t height, int64_t width, float* pooled, int32_t* argmax);

// The first block of a one-channel CNN in one pass: the 3x3 convolution (padding 1) of input
// [samples, 1, height, width] with weight [out, 1, 3, 3] and bias [out], then relu_max_pool2 of
// each plane, without keeping the convolution's output. Runs on LibTorch's intra-op threads.
// (LibTorch 1.13 picks oneDNN there, which took 0.037 ms per 28x28 image and 16 outputs.)
void conv3x3_relu_max_pool2_one_channel(const float* input, int64_t samples, int64_t height, int64_t width, const float* weight,
                                        const float* bias, int64_t out, float* pooled, int32_t* argmax);

// One sample's (or, in conv3x3_votes, the first sample's) buffers for a block: input [in, height,
// width] (the block's input), pooled and argmax [out, pooled_height, pooled_width] from
// relu_max_pool2, pooled_gradient (the loss's gradient at the pooled outputs, before the ReLU) and,
// unless null, input_gradient [in, height, width] to be written.
struct ConvBlockSample {
  const float* input = nullptr;
  const float* pooled = nullptr;
  const float* pooled_gradient = nullptr;
  const int32_t* argmax = nullptr;
  float* input_gradient = nullptr;
};

// For `samples` consecutive samples laid out from `first` on, with weight [out, in, 3, 3]: adds
// every sample's descent votes -sign(G_n) to weight_votes [out, in, 3, 3] and -sign(b_n) to
// bias_votes [out], and writes the gradient of the summed loss with respect to the block's input
// where `first.input_gradient` asks for it. The ReLU passes a gradient only where the pooled value
// is positive. An entry whose gradient is exactly 0 casts no vote, and a bias whose per-sample sum
// cancels (|sum| <= cancellation_tolerance * sum of |terms|) casts none either. Runs on
// LibTorch's intra-op threads, split by sample.
void conv3x3_votes(const ConvBlockShape& shape, int64_t samples, const ConvBlockSample& first, const float* weight,
                   double cancellation_tolerance, int32_t* weight_votes, int32_t* bias_votes);

}  // namespace gradfix
