#pragma once
// Internal to the LibTorch part: statistics from per-sample gradients. For max mode a vote count
// per entry (sum over samples of sign(-g_n)) in a small integer type, for mean mode the sum of
// -g_n in float64. The sharded executor feeds them the captures of its recomputations.
//
// The per-sample gradient of a Linear weight is a product G_n^T X_n per sample. These products
// are the pass's largest arrays (samples x parameters), so they are formed a tile of rows at a
// time into one reused buffer, and each tile's signs are counted straight into the statistics:
// one read of the products instead of the five passes (negate, sign, sum, convert, add) and the
// fresh pages of whole-tensor operations.
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "architecture.hpp"

namespace gradfix {

// Bytes of one tile of per-sample products. Smaller tiles make smaller matrix products, which
// OpenBLAS runs more slowly: on the 20M-parameter Llama of bench_vote_rate.sh the products took
// 2.13 s in tiles of 256 KiB, 1.33 s of 1 MiB, 0.97-1.01 s from 8 MiB to whole (64 MiB).
constexpr long long kProductTileBytes = 8LL << 20;

// Adds per-sample gradients `per_sample` [n, ...] to `target`'s statistics: vote counts in an
// integer type, or sums of -gradients in float64. `per_sample` is consumed (it may be changed).
void add_statistics(torch::Tensor target, torch::Tensor per_sample);

// Called on each tile of products [n, end - begin, cols] before its signs are taken: rows
// [begin, end) of the product. A tied head adds its embedding rows there.
using TileHook = std::function<void(torch::Tensor& tile, int64_t begin, int64_t end)>;

// Running statistics of the tensors of one step (a layer, the head, the embedding), over this
// rank's samples, in the type they are reduced in. A tensor's statistics may cover some of its
// rows only (`shape` then names those): a token embedding's used rows.
class Accumulators {
 public:
  // `tile_bytes` bounds one tile of per-sample products (tests use small tiles). `products` is
  // the type the per-sample products are formed in: float32, or bfloat16 (--vote-precision bf16:
  // both factors rounded to bfloat16, the products accumulated in float32 and rounded once to
  // bfloat16, whose sign is the float32 sum's; for vote counts only).
  Accumulators(torch::ScalarType type, const torch::Device& device, long long tile_bytes = kProductTileBytes,
               torch::ScalarType products = torch::kFloat32);

  torch::Tensor& of(const std::string& name, const std::vector<int64_t>& shape);
  torch::Tensor zeros(const std::vector<int64_t>& shape) const { return torch::zeros(shape, torch::TensorOptions().dtype(type_).device(device_)); }
  // Adds the per-sample gradients `per_sample` [n, rows, ...] to the statistics of the
  // parameter's first `rows` rows (all of them but for a position embedding longer than the
  // data's sequences); consumed.
  void add(const std::string& name, const std::vector<int64_t>& shape, torch::Tensor per_sample);
  // Adds per-sample gradients of a few rows: `rows` [k] row indices, `values` [k, H] (one sample).
  void add_rows(const std::string& name, const std::vector<int64_t>& shape, const torch::Tensor& rows, torch::Tensor values);
  // Adds the per-sample products left[n] x right[n] ([n, rows, k] x [n, k, cols]) to `target`
  // [rows, ...] (cols elements per row), tile by tile; `hook` sees each tile
  // before its signs are taken.
  void add_products(torch::Tensor target, const torch::Tensor& left, const torch::Tensor& right, const TileHook& hook = {});
  std::map<std::string, torch::Tensor>& values() { return values_; }

 private:
  torch::ScalarType type_;
  torch::Device device_;
  long long tile_bytes_;
  torch::ScalarType products_;
  std::map<std::string, torch::Tensor> values_;
  torch::Tensor tile_;       // reused for every tile of products
  torch::Tensor tile_f32_;   // bfloat16 products widened for a hook or LibTorch's operations
};

// The per-sample gradient rows of an embedding (sample i: the rows of its token ids), added to
// `dense` rows [begin, end) when given (a tied head's block), else straight into the statistics.
void embedding_rows(const torch::Tensor& ids, const torch::Tensor& gradient, int64_t sample, torch::Tensor* dense, int64_t begin, int64_t end,
                    Accumulators* accumulators, const std::string& name, const std::vector<int64_t>& shape);

// Statistics from the captures of one recomputation (the fast method).
void add_captures(const std::vector<Capture>& captures, const std::map<std::string, std::vector<int64_t>>& shapes, Accumulators& accumulators);

}  // namespace gradfix
