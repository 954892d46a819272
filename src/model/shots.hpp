#pragma once
// Internal to the model jobs: the one place where a job's shots are drawn from its pool, for every
// model kind (classifiers, decoders, CLIP) and every subcommand (signs, transport, sweep, demo).

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gradfix/io/selection.hpp"
#include "gradfix/dist/job_context.hpp"
#include "gradfix/model/jobs.hpp"
#include "sharded_executor.hpp"

namespace gradfix {

// What a job knows of its pool when it draws shots.
struct ShotPool {
  long long samples = 0;
  std::vector<long long> labels;  // empty: unlabelled (token data)
  long long classes = 0;          // per-class draws cover classes 0 .. classes - 1
  std::string name;               // the data, for messages
  // Features of pool rows for coreset, kmedoids and herding when no --selection-features file is
  // given (the model's own embedding); empty: the model has none, and the file is required.
  FeatureSource model_features;
  // The model's inputs for pool rows (images [n, ...]), for a TorchScript feature extractor
  // (--selection-features torchscript:ARCHIVE), on the CPU where the module runs; empty: none.
  std::function<torch::Tensor(const std::vector<long long>& indices)> inputs;
};

// The feature rows of `indices`, `chunk` samples at a time: `compute` maps a chunk's indices to a
// tensor [n, ...] (flattened to rows); InputError naming `who` when it returns another number of
// rows or changes width between chunks.
FeatureMatrix features_in_chunks(const std::vector<long long>& indices, std::size_t chunk,
                                 const std::function<torch::Tensor(const std::vector<long long>&)>& compute, const std::string& who);

// Writes the chosen shots where --save-indices says (rank 0; nothing without it).
void save_chosen_shots(const ShotSelection& selection, const std::vector<long long>& indices, const JobContext& context);

// Feature rows [n, D] as a FeatureMatrix (float32, on the CPU).
FeatureMatrix to_feature_matrix(const torch::Tensor& rows);

// The model's own features of pool rows (LayeredModel::features) through the sharded executor:
// `samples` turns a subset of `data` into what the executor reads. The weights are read on first
// use unless given. Collective: every rank asks for the same rows.
template <typename Data, typename Samples>
FeatureSource sharded_feature_source(const LayeredModel& model, const Data& data, Samples samples, std::shared_ptr<ShardedWeights> weights,
                                     const JobContext& context, const torch::Device& device) {
  return [&model, &data, samples, weights, &context, device](const std::vector<long long>& indices) mutable {
    if (!weights) weights = std::make_shared<ShardedWeights>(model.layout(), model.directory(), context);
    const Data part = data.subset(indices);
    return to_feature_matrix(sharded_features(model, *weights, samples(part), context, device));
  };
}

// The features a TorchScript module computes from the pool's inputs: one row per sample, in
// chunks of 64 (the archive's forward(x) -> [n, D], no gradients).
FeatureSource torchscript_features(const std::string& archive, const std::function<torch::Tensor(const std::vector<long long>&)>& inputs);

// The shots, in this order of precedence: --indices FILE; --num-batches N (batches of
// --batch-size from a seeded shuffle); --num-samples N (the first N of a shuffle with the seed;
// fewer than the pool when `leave_for_support`); K per class by --selection (labelled pools);
// every sample (unlabelled pools). Identical on every rank; `model_features` may be collective.
std::vector<long long> choose_shots(const ShotPool& pool, const ShotSelection& selection, long long per_class, long long num_samples,
                                    std::uint64_t seed, bool leave_for_support);


}  // namespace gradfix
