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

// For `samples` samples: input [samples, in, height, width] (the block's input), pooled_gradient
// [samples, out, pooled_height, pooled_width] (the loss's gradient at the pooled outputs, already
// multiplied by the ReLU's derivative), argmax from relu_max_pool2, weight [out, in, 3, 3].
// Subtracts sign(G_n) of every sample's weight gradient from votes [out, in, 3, 3] (a descent vote)
// and, unless input_gradient is null, writes the gradient of the summed loss with respect to the
// block's input there [samples, in, height, width]. An entry whose gradient is exactly 0 casts no
// vote. Runs on LibTorch's intra-op threads, split by sample.
void conv3x3_votes(const ConvBlockShape& shape, int64_t samples, const float* input, const float* pooled_gradient,
                   const int32_t* argmax, const float* weight, int32_t* votes, float* input_gradient);

}  // namespace gradfix
