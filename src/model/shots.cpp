#include "shots.hpp"

#include <algorithm>

#include "gradfix/core/error.hpp"
#include "gradfix/data/dataset.hpp"

namespace gradfix {

std::vector<long long> choose_shots(const ShotPool& pool, const ShotSelection& selection, long long per_class, long long num_samples,
                                    std::uint64_t seed, bool leave_for_support) {
  const ShotStrategy strategy = parse_shot_strategy(selection.strategy);
  const bool per_class_draw = selection.indices_file.empty() && selection.num_batches == 0 && num_samples == 0 && !pool.labels.empty();
  if (strategy != ShotStrategy::kRandom && !per_class_draw)
    throw InputError("--selection " + selection.strategy + " picks K shots per class (--shots-per-class) of labelled data; " +
                     (pool.labels.empty() ? pool.name + " has no labels" : std::string("not with --indices, --num-batches or --num-samples")));
  std::vector<long long> everything(static_cast<std::size_t>(pool.samples));
  for (long long i = 0; i < pool.samples; ++i) everything[static_cast<std::size_t>(i)] = i;
  if (!selection.indices_file.empty()) return read_indices(selection.indices_file, pool.samples);
  if (selection.num_batches > 0) return first_batches(everything, selection.num_batches, selection.batch_size, seed);
  if (num_samples > 0) {
    if (num_samples > pool.samples || (leave_for_support && num_samples == pool.samples))
      throw InputError(pool.name + ": --num-samples " + std::to_string(num_samples) + " but the pool holds " + std::to_string(pool.samples) +
                       " samples" + (leave_for_support ? " and the support set needs some of them" : ""));
    const auto order = shuffled_indices(pool.samples, seed);
    return std::vector<long long>(order.begin(), order.begin() + num_samples);
  }
  if (pool.labels.empty()) return everything;
  FeatureSource features;
  if (strategy != ShotStrategy::kRandom) {
    if (!selection.features_file.empty())
      features = features_from_file(selection.features_file, pool.samples);
    else if (pool.model_features)
      features = pool.model_features;
    else
      throw InputError("--selection " + selection.strategy + " needs features: this model has no built-in embedding, give --selection-features FILE");
  }
  return select_per_class(pool.labels, everything, pool.classes, per_class, strategy, seed, features);
}

void save_shot_indices(const ShotSelection& selection, const std::vector<long long>& indices, const JobContext& context) {
  if (selection.save_indices.empty()) return;
  context.agree([&] {
    if (context.is_root()) write_indices(selection.save_indices, indices);
  });
}

}  // namespace gradfix
