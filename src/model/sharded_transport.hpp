#pragma once
// Internal to the LibTorch part: transport with the parameters sharded, for any model of the
// layer executor (decoders, CLIP). Each rank holds its pieces of B, of tau and of tau_B; every
// evaluation of B + alpha * tau gathers one stage at a time; the GradFix model is written piece
// by piece in B's format with B's model files.

#include <ostream>
#include <string>
#include <vector>

#include "architecture.hpp"
#include "sharded_executor.hpp"
#include "shots.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {

struct ShardedTransportData {
  SampleSource shots;    // the few-shot gradients
  SampleSource support;  // alpha is chosen on its mean loss
  SampleSource test;     // read only for the rows
  std::string metric;       // the table's accuracy column ("test acc", "test tok acc")
  std::string metric_json;  // what the accuracy is in results.json ("accuracy", "token_accuracy")
};

// Rows: zero-shot, naive, GradFix, and with B_ft the oracle and the upper bound. Collective.
std::vector<TransportRow> run_sharded_transport(const TransportJob& job, const LayeredModel& model, const ShardedTransportData& data,
                                               const torch::Device& device, std::ostream& log, const JobContext& context);

// Adam on this rank's pieces, as torch.optim.Adam takes it with its defaults (betas 0.9 and
// 0.999, epsilon 1e-8, no weight decay), in double per entry and kept in float32. The update is
// held as an offset from the weights (the model is B + 1 * update), so B is never copied.
class ShardedAdam {
 public:
  // `shape`: pieces of the sizes to update (this rank's weights); `start`: the update to begin
  // from (null: zeros, B itself).
  ShardedAdam(const std::vector<std::vector<float>>& shape, const std::vector<std::vector<float>>* start);
  // One step on the mean gradient of the statistics' samples, from their summed -gradients.
  void step(const ShardedStatistics& statistics, double lr);
  // The update so far; its storage stays in place, so it can be the weights' offset.
  const std::vector<std::vector<float>>& update() const { return update_; }

 private:
  std::vector<std::vector<float>> update_, first_, second_;
  long long steps_ = 0;
};

// Minibatch Adam with the parameters sharded, what `gradfix train` runs on a model directory:
// `epochs` passes over `data` in an order shuffled per epoch (seeded by `seed` and the epoch),
// `batch` samples a step (an epoch's last step takes the rest), each step one mean-gradient pass
// whose sums over the ranks are exact, so the update is the same at any P. Returns the update:
// the trained model is B + 1 * update. Collective.
std::vector<std::vector<float>> sharded_train(const LayeredModel& model, ShardedWeights& weights, const SampleSource& data, int epochs,
                                              long long batch, double lr, std::uint64_t seed, const JobContext& context,
                                              const torch::Device& device);

// Writes B + alpha * delta (this rank's pieces of the model's tensors, float32) to `out` in the
// format and dtypes of the checkpoint at `source`, with its other tensors and its model files
// (config.json, tokenizer); published when every rank has written. Collective.
void write_moved_model(const std::string& source, const std::string& out, const ShardedWeights& weights,
                       const std::vector<std::vector<float>>& delta, double alpha, const Metadata& metadata, const JobContext& context);

// The shots of `pool` (shots.hpp: an indices file, the first --num-samples of a seeded shuffle,
// or --shots-per-class per label by --selection) and the support set (the next --support-size
// of that shuffle, disjoint from the shots).
void split_pool(const ShotPool& pool, const TransportJob& job, std::vector<long long>& shots, std::vector<long long>& support);

}  // namespace gradfix
