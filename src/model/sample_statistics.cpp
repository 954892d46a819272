#include "sample_statistics.hpp"

#include <algorithm>
#include <cstdint>

#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

// Adds the descent signs of `products` [n, size] (float32) to `counts` [size]: +1 where a
// sample's gradient is negative, -1 where it is positive, as sign(-g) summed. No sample count
// reaches the range of Count: vote_count_dtype sized it for all samples.
template <typename Count>
void count_signs(const float* products, int64_t n, int64_t size, Count* counts) {
  for (int64_t i = 0; i < n; ++i) {
    const float* p = products + i * size;
    for (int64_t j = 0; j < size; ++j) counts[j] = static_cast<Count>(counts[j] + (p[j] < 0.0f) - (p[j] > 0.0f));
  }
}

// The same on bfloat16 products, read as their bits: the sign bit, and a magnitude that is not
// zero (a product that rounded to a signed zero casts no vote, as 0.0f does).
template <typename Count>
void count_signs_bf16(const std::uint16_t* products, int64_t n, int64_t size, Count* counts) {
  for (int64_t i = 0; i < n; ++i) {
    const std::uint16_t* p = products + i * size;
    for (int64_t j = 0; j < size; ++j) {
      const int nonzero = (p[j] & 0x7fffu) != 0, negative = p[j] >> 15;
      counts[j] = static_cast<Count>(counts[j] + nonzero * (2 * negative - 1));
    }
  }
}

// Adds the sum over samples of -products [n, size] to `sums` [size], summed in float64 over the
// samples first, as add_statistics does.
void sum_descents(const float* products, int64_t n, int64_t size, double* sums) {
  constexpr int64_t kBlock = 512;
  double partial[kBlock];
  for (int64_t begin = 0; begin < size; begin += kBlock) {
    const int64_t width = std::min(kBlock, size - begin);
    std::fill(partial, partial + width, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      const float* p = products + i * size + begin;
      for (int64_t j = 0; j < width; ++j) partial[j] -= static_cast<double>(p[j]);
    }
    for (int64_t j = 0; j < width; ++j) sums[begin + j] += partial[j];
  }
}

// One tile of products [n, ...] into `target` (its rows, contiguous on the CPU): float32 products
// for every statistics type, bfloat16 products for vote counts.
void add_tile(torch::Tensor target, const torch::Tensor& tile) {
  const int64_t n = tile.size(0), size = tile.numel() / std::max<int64_t>(1, n);
  GRADFIX_CHECK(target.numel() == size, "a tile of per-sample products does not match its statistics");
  if (tile.scalar_type() == torch::kBFloat16) {
    const auto* bits = reinterpret_cast<const std::uint16_t*>(tile.data_ptr());
    switch (target.scalar_type()) {
      case torch::kChar: count_signs_bf16(bits, n, size, target.data_ptr<int8_t>()); return;
      case torch::kShort: count_signs_bf16(bits, n, size, target.data_ptr<int16_t>()); return;
      case torch::kInt: count_signs_bf16(bits, n, size, target.data_ptr<int32_t>()); return;
      default: GRADFIX_CHECK(false, "bfloat16 products are for vote counts only");
    }
  }
  const float* products = tile.data_ptr<float>();
  switch (target.scalar_type()) {
    case torch::kChar: count_signs(products, n, size, target.data_ptr<int8_t>()); break;
    case torch::kShort: count_signs(products, n, size, target.data_ptr<int16_t>()); break;
    case torch::kInt: count_signs(products, n, size, target.data_ptr<int32_t>()); break;
    case torch::kDouble: sum_descents(products, n, size, target.data_ptr<double>()); break;
    default: add_statistics(target, tile); break;
  }
}

// Multiply-adds per sample below which a bfloat16 product is formed from its rounded factors in
// float32 (LibTorch 1.13 sends products of fewer than 400 to a loop that accumulates in the
// element type; some margin above that).
constexpr int64_t kSmallestBfloat16Product = 4096;

}  // namespace

void add_statistics(torch::Tensor target, torch::Tensor per_sample) {
  per_sample.neg_();
  // view_as: a convolution's per-sample gradients come as [n, rows, in] for its [rows, c, h, w].
  if (target.scalar_type() == torch::kFloat64) {
    target.add_(per_sample.sum(0, false, torch::kFloat64).view_as(target));
  } else {
    per_sample.sign_();
    target.add_(per_sample.sum(0).to(target.scalar_type()).view_as(target));
  }
}

torch::Tensor& Accumulators::of(const std::string& name, const std::vector<int64_t>& shape) {
  auto found = values_.find(name);
  if (found == values_.end()) found = values_.emplace(name, zeros(shape)).first;
  return found->second;
}

void Accumulators::add(const std::string& name, const std::vector<int64_t>& shape, torch::Tensor per_sample) {
  torch::Tensor target = of(name, shape);
  if (per_sample.dim() > 1 && per_sample.size(1) != target.size(0)) target = target.slice(0, 0, per_sample.size(1));
  add_statistics(target, std::move(per_sample));
}

void Accumulators::add_rows(const std::string& name, const std::vector<int64_t>& shape, const torch::Tensor& rows, torch::Tensor values) {
  torch::Tensor& target = of(name, shape);
  values.neg_();
  if (type_ != torch::kFloat64) values.sign_();
  target.index_add_(0, rows, values.to(type_));
}

Accumulators::Accumulators(torch::ScalarType type, const torch::Device& device, long long tile_bytes, torch::ScalarType products)
    : type_(type), device_(device), tile_bytes_(tile_bytes), products_(products) {
  GRADFIX_CHECK(products == torch::kFloat32 || (products == torch::kBFloat16 && type != torch::kFloat64),
                "per-sample products are float32, or bfloat16 for vote counts");
}

void Accumulators::add_products(torch::Tensor target, const torch::Tensor& left, const torch::Tensor& right, const TileHook& hook) {
  const int64_t n = left.size(0), rows = left.size(1), cols = right.size(2);
  // Narrowed once per call, not per tile (a transposed factor stays a transposed view).
  const bool narrow = products_ == torch::kBFloat16 && left.scalar_type() == torch::kFloat32;
  const torch::Tensor a = narrow ? left.to(torch::kBFloat16) : left, b = narrow ? right.to(torch::kBFloat16) : right;
  const int64_t element_bytes = static_cast<int64_t>(a.element_size());
  const int64_t tile_rows = std::clamp<int64_t>(tile_bytes_ / std::max<int64_t>(1, n * cols * element_bytes), 1, std::max<int64_t>(1, rows));
  const int64_t tile_elements = n * tile_rows * cols;
  if (!tile_.defined() || tile_.numel() < tile_elements || tile_.device() != a.device() || tile_.scalar_type() != a.scalar_type())
    tile_ = torch::empty({tile_elements}, a.options());
  // The fused count reads the products in place on the CPU; a GPU, and a hook on bfloat16 products
  // (a tied head adds its embedding rows, which bfloat16 would round), take float32 products and
  // LibTorch's operations.
  const bool widen = a.scalar_type() == torch::kBFloat16 && (hook || !target.device().is_cpu());
  const bool fused = target.device().is_cpu() && target.is_contiguous() && (a.scalar_type() == torch::kFloat32 || !widen);
  torch::Tensor a_wide, b_wide;  // the rounded factors in float32, for products too small for a fast kernel
  for (int64_t begin = 0; begin < rows; begin += tile_rows) {
    const int64_t end = std::min(rows, begin + tile_rows);
    torch::Tensor tile = tile_.narrow(0, 0, n * (end - begin) * cols).view({n, end - begin, cols});
    if (a.scalar_type() == torch::kBFloat16 && (end - begin) * cols * a.size(2) < kSmallestBfloat16Product) {
      // LibTorch forms very small bfloat16 products in a loop that accumulates in bfloat16; the
      // rounded factors' products in float32 are what a fast kernel computes, exactly summed.
      if (!a_wide.defined()) {
        a_wide = a.to(torch::kFloat32);
        b_wide = b.to(torch::kFloat32);
      }
      tile.copy_(torch::bmm(a_wide.slice(1, begin, end), b_wide));
    } else {
      torch::bmm_out(tile, a.slice(1, begin, end), b);
    }
    if (widen) {
      if (!tile_f32_.defined() || tile_f32_.numel() < tile_elements || tile_f32_.device() != a.device())
        tile_f32_ = torch::empty({tile_elements}, a.options().dtype(torch::kFloat32));
      torch::Tensor wide = tile_f32_.narrow(0, 0, tile.numel()).view(tile.sizes());
      wide.copy_(tile);
      tile = wide;
    }
    if (hook) hook(tile, begin, end);
    if (fused) add_tile(target.slice(0, begin, end), tile);
    else add_statistics(target.slice(0, begin, end), tile);
  }
}

void embedding_rows(const torch::Tensor& ids, const torch::Tensor& gradient, int64_t sample, torch::Tensor* dense, int64_t begin, int64_t end,
                    Accumulators* accumulators, const std::string& name, const std::vector<int64_t>& shape) {
  const torch::Tensor sample_ids = ids[sample];
  const torch::Tensor sample_gradient = gradient[sample];
  if (dense != nullptr) {  // a tied head: into its dense block before any sign is taken
    const torch::Tensor inside = sample_ids.ge(begin).logical_and(sample_ids.lt(end)).nonzero().squeeze(1);
    if (inside.numel() == 0) return;
    (*dense)[sample].index_add_(0, sample_ids.index_select(0, inside) - begin, sample_gradient.index_select(0, inside));
    return;
  }
  // Rows of one sample summed per distinct token: that sample's gradient of each touched row.
  const auto [unique, inverse] = torch::_unique(sample_ids, true, true);
  torch::Tensor rows = torch::zeros({unique.size(0), sample_gradient.size(1)}, sample_gradient.options()).index_add_(0, inverse, sample_gradient);
  accumulators->add_rows(name, shape, unique, rows);
}

void add_captures(const std::vector<Capture>& captures, const std::map<std::string, std::vector<int64_t>>& shapes, Accumulators& accumulators) {
  for (const auto& capture : captures) {
    const auto& shape = shapes.at(capture.parameter);
    const torch::Tensor gradient = capture.output.grad();
    GRADFIX_CHECK(gradient.defined(), "no gradient reached the output of " + capture.parameter);
    switch (capture.kind) {
      case Capture::Kind::kLinearWeight:  // G_n^T X_n: [n, out, T] x [n, T, in]
        accumulators.add_products(accumulators.of(capture.parameter, shape), gradient.transpose(1, 2), capture.input);
        break;
      case Capture::Kind::kBias:  // a new tensor: consumable
        accumulators.add(capture.parameter, shape, without_cancelled(gradient.sum(1), gradient.abs().sum(1)));
        break;
      case Capture::Kind::kScale: accumulators.add(capture.parameter, shape, (gradient * capture.input).sum(1)); break;
      case Capture::Kind::kAdditive: accumulators.add(capture.parameter, shape, gradient.clone()); break;
      case Capture::Kind::kEmbedding:
        for (int64_t i = 0; i < capture.input.size(0); ++i)
          embedding_rows(capture.input, gradient, i, nullptr, 0, 0, &accumulators, capture.parameter, shape);
        break;
    }
  }
}

}  // namespace gradfix
