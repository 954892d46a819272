#include "shots.hpp"

#include <torch/script.h>

#include <algorithm>
#include <memory>

#include "gradfix/io/error.hpp"
#include "gradfix/io/dataset.hpp"

namespace gradfix {

namespace {

// The features the strategies compare: a features file, a TorchScript extractor, or the model's own.
FeatureSource features_for(const ShotPool& pool, const ShotSelection& selection) {
  const std::string kTorchScript = "torchscript:";
  if (selection.features_file.rfind(kTorchScript, 0) == 0) {
    if (!pool.inputs) throw InputError("--selection-features " + selection.features_file + ": this model's data are not images a TorchScript module takes");
    return torchscript_features(selection.features_file.substr(kTorchScript.size()), pool.inputs);
  }
  if (!selection.features_file.empty()) return features_from_file(selection.features_file, pool.samples);
  if (pool.model_features) return pool.model_features;
  throw InputError("--selection " + selection.strategy + " needs features: this model has no built-in embedding, give --selection-features FILE");
}

}  // namespace

std::vector<long long> choose_shots(const ShotPool& pool, const ShotSelection& selection, long long per_class, long long num_samples,
                                    std::uint64_t seed, bool leave_for_support) {
  const ShotStrategy strategy = parse_shot_strategy(selection.strategy);
  const bool labelled = !pool.labels.empty();
  // The strategies pick K per class of labelled data, or N of an unlabelled pool (one class).
  const bool per_class_draw = selection.indices_file.empty() && selection.num_batches == 0 && num_samples == 0 && labelled;
  const bool whole_pool_draw = selection.indices_file.empty() && selection.num_batches == 0 && num_samples > 0 && !labelled;
  if (strategy != ShotStrategy::kRandom && !per_class_draw && !whole_pool_draw)
    throw InputError("--selection " + selection.strategy + " picks K shots per class (--shots-per-class) of labelled data, or " +
                     "--num-samples N of unlabelled data; not with --indices, --num-batches" +
                     (labelled ? std::string(" or --num-samples") : std::string(" or without --num-samples")));
  std::vector<long long> everything(static_cast<std::size_t>(pool.samples));
  for (long long i = 0; i < pool.samples; ++i) everything[static_cast<std::size_t>(i)] = i;
  if (!selection.indices_file.empty()) return read_indices(selection.indices_file, pool.samples);
  if (selection.num_batches > 0) return first_batches(everything, selection.num_batches, selection.batch_size, seed);
  if (num_samples > 0) {
    if (num_samples > pool.samples || (leave_for_support && num_samples == pool.samples))
      throw InputError(pool.name + ": --num-samples " + std::to_string(num_samples) + " but the pool holds " + std::to_string(pool.samples) +
                       " samples" + (leave_for_support ? " and the support set needs some of them" : ""));
    if (strategy != ShotStrategy::kRandom)
      return select_per_class(std::vector<long long>(static_cast<std::size_t>(pool.samples), 0), everything, 1, num_samples, strategy, seed,
                              features_for(pool, selection));
    const auto order = shuffled_indices(pool.samples, seed);
    return std::vector<long long>(order.begin(), order.begin() + num_samples);
  }
  if (!labelled) return everything;
  return select_per_class(pool.labels, everything, pool.classes, per_class, strategy, seed,
                          strategy == ShotStrategy::kRandom ? FeatureSource() : features_for(pool, selection));
}

void save_chosen_shots(const ShotSelection& selection, const std::vector<long long>& indices, const JobContext& context) {
  if (context.is_root() && !selection.save_indices.empty()) write_indices(selection.save_indices, indices);
}

FeatureMatrix to_feature_matrix(const torch::Tensor& rows) {
  const torch::Tensor values = rows.to(torch::kCPU, torch::kFloat32).contiguous();
  FeatureMatrix out;
  out.rows = values.size(0);
  out.dim = values.size(1);
  out.values.assign(values.data_ptr<float>(), values.data_ptr<float>() + values.numel());
  return out;
}

FeatureMatrix features_in_chunks(const std::vector<long long>& indices, std::size_t chunk,
                                 const std::function<torch::Tensor(const std::vector<long long>&)>& compute, const std::string& who) {
  FeatureMatrix out;
  out.rows = static_cast<long long>(indices.size());
  for (std::size_t begin = 0; begin < indices.size(); begin += chunk) {
    const std::vector<long long> part(indices.begin() + static_cast<long long>(begin),
                                      indices.begin() + static_cast<long long>(std::min(indices.size(), begin + chunk)));
    torch::Tensor rows = compute(part);
    if (rows.dim() < 2 || rows.size(0) != static_cast<int64_t>(part.size()))
      throw InputError(who + " returned " + format_shape(std::vector<long long>(rows.sizes().begin(), rows.sizes().end())) + " for " +
                       std::to_string(part.size()) + " samples; it must return one row per sample, [n, D]");
    rows = rows.reshape({rows.size(0), -1}).to(torch::kCPU, torch::kFloat32).contiguous();
    if (out.dim != 0 && rows.size(1) != out.dim) throw InputError(who + "'s width changed between batches");
    out.dim = rows.size(1);
    out.values.insert(out.values.end(), rows.data_ptr<float>(), rows.data_ptr<float>() + rows.numel());
  }
  return out;
}

FeatureSource torchscript_features(const std::string& archive, const std::function<torch::Tensor(const std::vector<long long>&)>& inputs) {
  auto module = std::make_shared<torch::jit::Module>();
  try {
    *module = torch::jit::load(archive);
  } catch (const c10::Error& error) {
    const std::string what = error.what();
    throw InputError(archive + ": cannot load as a TorchScript archive: " + what.substr(0, what.find('\n')));
  }
  module->eval();
  return [module, inputs, archive](const std::vector<long long>& indices) {
    torch::NoGradGuard no_gradients;
    return features_in_chunks(indices, 64, [&](const std::vector<long long>& part) {
      try {
        return module->forward({inputs(part)}).toTensor();
      } catch (const c10::Error& error) {
        const std::string what = error.what();
        throw InputError(archive + ": the feature extractor failed on " + std::to_string(part.size()) + " samples: " + what.substr(0, what.find('\n')));
      }
    }, archive + ": the feature extractor");
  };
}


}  // namespace gradfix
