#pragma once
// Internal to the LibTorch part: the sharded layer executor. A model (architecture.hpp) whose
// parameters are spread over the ranks, and the few-shot gradient pass and the evaluation that
// run on it stage by stage (the pattern of fully sharded data parallelism). No rank holds the
// whole model: each keeps its pieces of the shard plan, gathers one stage's tensors for one step,
// and drops them after. Nothing here knows an architecture.
//
//   forward   for each stage: gather it, run this rank's samples, keep the boundary activation
//   backward  for each layer, last first: gather it again, recompute it from its boundary with
//             autograd, backpropagate, form per-sample gradients from the recorded inputs and
//             output gradients (batched products), turn them into votes or sums
//   reduce    sum the layer's statistics over the ranks; each rank keeps the pieces it owns
//   write     every rank writes its pieces into one statistics checkpoint (model's names)

#include <future>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "architecture.hpp"
#include "gradfix/io/dtype.hpp"
#include "gradfix/dist/job_context.hpp"
#include "gradfix/model/jobs.hpp"
#include "gradfix/dist/plan.hpp"

namespace gradfix {

// A gather started ahead of its use (ShardedWeights::gather_ahead): on the helper thread where
// the context has communicators for it, else on the calling thread when taken. Take it once;
// a gather not taken is waited for on destruction (every rank started it, so it completes).
template <typename Result>
class Pending {
 public:
  Pending() = default;
  Pending(std::future<Result> result, torch::Device device) : result_(std::move(result)), device_(device) {}
  bool valid() const { return result_.valid(); }
  // The gathered tensors; the wait is timed as a gather wait (--report-time).
  Result take();

 private:
  std::future<Result> result_;
  torch::Device device_ = torch::kCPU;
};

class ShardedWeights {
 public:
  // Reads this rank's pieces of every tensor of `layout` from the checkpoint at `path`
  // (collective only in that every rank computes the same plan).
  ShardedWeights(std::vector<TensorInfo> layout, const std::string& path, const JobContext& context);
  const std::vector<TensorInfo>& layout() const { return layout_; }
  // The layout's entry of the tensor `name` (it must be there).
  const TensorInfo& info(const std::string& name) const { return layout_[index_of(name)]; }
  const ShardPlan& plan() const { return plan_; }
  // This rank's pieces of the weights, in plan order.
  const std::vector<std::vector<float>>& pieces() const { return mine_; }
  // Whole tensors of `names` as float32 on `device`. Collective: every rank passes the same names.
  // On a GPU with a device communicator (--backend nccl) the pieces travel device to device;
  // otherwise through the host communicator (MPI).
  Parameters gather(const std::vector<std::string>& names, const torch::Device& device) const;
  // Rows `rows` (ascending, distinct indices of dim 0) of the tensor `name`, [rows, ...] float32
  // on `device`: a block of a vocabulary head, the embedding rows of the data's tokens. Only
  // these rows travel, from the ranks that own them. Collective: every rank passes the same name
  // and rows.
  torch::Tensor gather_rows(const std::string& name, const std::vector<int64_t>& rows, const torch::Device& device) const;
  // The same gathers started now and taken later, so that the next stage's weights travel while
  // this one computes (the prefetch of fully sharded data parallelism, one stage ahead: a loop
  // takes stage i, starts i + 1, then computes i). Every rank starts the same gathers in the same
  // order. They run on a helper thread over the context's ahead communicators (MPI on a twin of
  // the world; NCCL on a twin of stats, on a side stream); without those, when taken.
  Pending<Parameters> gather_ahead(std::vector<std::string> names, const torch::Device& device) const;
  Pending<torch::Tensor> gather_rows_ahead(std::string name, std::vector<int64_t> rows, const torch::Device& device) const;
  // From now on gather() and gather_rows() return weights + alpha * offset, elementwise in float32 as `apply`
  // computes it; `offset` holds pieces in plan order and must outlive its use; nullptr returns to
  // the weights themselves. This is how transport evaluates B + alpha * masked tau for every
  // alpha of the grid without a second copy of B. The owner of a piece adds, so the gathered
  // values do not depend on P.
  void set_offset(const std::vector<std::vector<float>>* offset, float alpha) {
    offset_ = offset;
    alpha_ = alpha;
  }

 private:
  // The gathers over `host` (MPI) or `stats` (a device communicator), untimed.
  Parameters gather_over(Communicator& host, Communicator& stats, const std::vector<std::string>& names, const torch::Device& device) const;
  torch::Tensor gather_rows_over(Communicator& host, Communicator& stats, const std::string& name, const std::vector<int64_t>& rows,
                                 const torch::Device& device) const;
  Parameters gather_on_device(Communicator& transport, const std::vector<std::string>& names, const torch::Device& device) const;
  // Runs `gather` on the helper thread over the ahead communicators, or deferred to its take().
  template <typename Result, typename Gather>
  Pending<Result> start(Gather gather, const torch::Device& device) const;
  // The layout index of `name`, and of each of `names` (each must be there).
  std::size_t index_of(const std::string& name) const;
  std::set<std::size_t> indices_of(const std::vector<std::string>& names) const;
  // Rank `rank`'s pieces of the `wanted` tensors in plan order; their elements added to `count`.
  std::vector<Piece> pieces_of(int rank, const std::set<std::size_t>& wanted, long long& count) const;
  // Elements [begin, begin + count) of this rank's piece k as gathered: the weights, plus alpha *
  // offset when one is set.
  void own_values(std::size_t k, long long begin, long long count, float* out) const;
  void own_values(std::size_t k, float* out) const { own_values(k, 0, static_cast<long long>(mine_[k].size()), out); }

  const JobContext& context_;
  std::vector<TensorInfo> layout_;
  std::map<std::string, std::size_t> index_;
  ShardPlan plan_;
  std::vector<std::vector<float>> mine_;  // values of this rank's pieces, in plan order
  const std::vector<std::vector<float>>* offset_ = nullptr;
  float alpha_ = 0.0f;
};

inline std::vector<int64_t> shape_of(const TensorInfo& tensor) { return {tensor.shape.begin(), tensor.shape.end()}; }

// Elements [begin, begin + count) of a tensor, found at `at` in a buffer that holds some of its
// rows end to end.
struct Run {
  long long begin = 0, count = 0, at = 0;
};

// The runs of `rows` (ascending) of a tensor whose rows are `width` elements, packed end to end:
// consecutive rows go together.
inline std::vector<Run> row_runs(const std::vector<int64_t>& rows, long long width) {
  std::vector<Run> runs;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (!runs.empty() && runs.back().begin + runs.back().count == rows[i] * width) runs.back().count += width;
    else runs.push_back({rows[i] * width, width, static_cast<long long>(i) * width});
  }
  return runs;
}

// This rank's pieces of the tensors of `layout` as stored in `reader`, in plan order, as
// float32; a tensor the reader does not hold reads as zeros (a task vector of part of a model).
std::vector<std::vector<float>> read_pieces(const TensorReader& reader, const std::vector<TensorInfo>& layout, const ShardPlan& plan,
                                            int rank);

struct ShardedSignsOptions {
  SignMode sign_mode = SignMode::kMax;
  VoteMethod method = VoteMethod::kFast;  // fast: batched per-sample products; loop: one backward per sample
  VotePrecision precision = VotePrecision::kF32;  // the type of the fast method's per-sample products (votes only)
  // false: a non-finite loss is not refused (few-shot fine-tuning at a learning rate that diverges
  // is a grid point to pass over, not broken weights).
  bool refuse_nonfinite = true;
};

// The statistics of this rank's pieces, in plan order, kept in the type they were reduced in:
// vote counts in the narrowest integer type that holds them (a quarter of the pieces' float32
// size for up to 127 samples), summed -gradients as float32.
struct ShardedStatistics {
  DType dtype = DType::kF32;
  std::vector<std::vector<unsigned char>> pieces;  // raw values of `dtype`
  long long samples = 0;
  // Elements [begin, begin + count) of piece k as float32 (exact for vote counts).
  void read_f32(std::size_t k, long long begin, long long count, float* out) const {
    convert_to_f32(dtype, pieces[k].data() + static_cast<std::size_t>(begin) * dtype_size(dtype), out, static_cast<std::size_t>(count));
  }
  std::vector<std::vector<float>> to_f32() const {
    std::vector<std::vector<float>> out(pieces.size());
    for (std::size_t k = 0; k < pieces.size(); ++k) {
      out[k].resize(pieces[k].size() / dtype_size(dtype));
      read_f32(k, 0, static_cast<long long>(out[k].size()), out[k].data());
    }
    return out;
  }
};

// Per-sample losses (data order) and next-token hits / target tokens of `data`, with the
// parameters sharded: a forward pass layer by layer, no rank holding the whole model. Samples go
// in fixed groups of 8, round-robin over the ranks, so the results do not depend on P. Collective.
struct ShardedEvaluation {
  std::vector<double> losses;
  long long hits = 0;
  long long targets = 0;
  // The mean of the per-sample losses, added in data order.
  double mean_loss() const {
    double sum = 0.0;
    for (double loss : losses) sum += loss;
    return sum / static_cast<double>(losses.size());
  }
};
// With `refuse_nonfinite` false a non-finite loss is reported as it is (a transport's alpha that
// overshoots) instead of refused as broken weights.
ShardedEvaluation sharded_evaluation(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data,
                                     const JobContext& context, const torch::Device& device, bool refuse_nonfinite = true);

// The feature rows (LayeredModel::features) of every sample of `data`, [samples, feature_size]
// float32 on the CPU, the same on every rank (each row computed by one rank, then summed over
// the ranks). Collective. The model must have features (feature_size() > 0).
torch::Tensor sharded_features(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data,
                               const JobContext& context, const torch::Device& device);

// The few-shot pass over `data` (every sample of it is a shot). Collective.
ShardedStatistics sharded_statistics(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data,
                                     const ShardedSignsOptions& options, const JobContext& context, const torch::Device& device);

// Writes every rank's pieces of the statistics as one checkpoint under the model's tensor names
// (vote counts in the narrowest integer type that holds them, mean-mode sums as F32), the same
// layout whatever P. Collective. Returns the dtype written.
// The metadata that records the votes' precision in a statistics file: none for f32 (the files
// of earlier releases), gradfix.vote_precision otherwise.
inline Metadata vote_precision_metadata(VotePrecision precision) {
  if (precision == VotePrecision::kF32) return {};
  return {{"gradfix.vote_precision", vote_precision_name(precision)}};
}

DType write_sharded_statistics(const JobContext& context, const ShardedWeights& weights, const ShardedStatistics& statistics,
                               SignMode sign_mode, std::uint64_t seed, const std::string& model_type, const std::string& out,
                               const Metadata& extra_metadata = {});

}  // namespace gradfix
