#pragma once
// Internal to the model jobs: the one place where a job's shots are drawn from its pool, for every
// model kind (classifiers, decoders, CLIP) and every subcommand (signs, transport, sweep, demo).

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "gradfix/data/selection.hpp"
#include "gradfix/dist/job_context.hpp"
#include "gradfix/model/jobs.hpp"

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
