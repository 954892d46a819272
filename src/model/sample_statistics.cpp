#include "sample_statistics.hpp"

#include <algorithm>

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

// One tile of products [n, ...] into `target` (its rows, contiguous on the CPU).
void add_tile(torch::Tensor target, const torch::Tensor& tile) {
  const int64_t n = tile.size(0), size = tile.numel() / std::max<int64_t>(1, n);
  GRADFIX_CHECK(target.numel() == size, "a tile of per-sample products does not match its statistics");
  const float* products = tile.data_ptr<float>();
  switch (target.scalar_type()) {
    case torch::kChar: count_signs(products, n, size, target.data_ptr<int8_t>()); break;
    case torch::kShort: count_signs(products, n, size, target.data_ptr<int16_t>()); break;
    case torch::kInt: count_signs(products, n, size, target.data_ptr<int32_t>()); break;
    case torch::kDouble: sum_descents(products, n, size, target.data_ptr<double>()); break;
    default: add_statistics(target, tile); break;
  }
}

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

void Accumulators::add_products(torch::Tensor target, const torch::Tensor& left, const torch::Tensor& right, const TileHook& hook) {
  const int64_t n = left.size(0), rows = left.size(1), cols = right.size(2);
  const int64_t tile_rows = std::clamp<int64_t>(tile_bytes_ / std::max<int64_t>(1, n * cols * 4), 1, std::max<int64_t>(1, rows));
  const int64_t tile_elements = n * tile_rows * cols;
  if (!tile_.defined() || tile_.numel() < tile_elements || tile_.device() != left.device() || tile_.scalar_type() != left.scalar_type())
    tile_ = torch::empty({tile_elements}, left.options());
  // The fused count reads the products in place on the CPU; a GPU takes LibTorch's operations.
  const bool fused = target.device().is_cpu() && target.is_contiguous() && left.scalar_type() == torch::kFloat32;
  for (int64_t begin = 0; begin < rows; begin += tile_rows) {
    const int64_t end = std::min(rows, begin + tile_rows);
    torch::Tensor tile = tile_.narrow(0, 0, n * (end - begin) * cols).view({n, end - begin, cols});
    torch::bmm_out(tile, left.slice(1, begin, end), right);
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
