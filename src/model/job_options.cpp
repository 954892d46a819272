// The checks of the model jobs' options, each beside nothing but its job type: no LibTorch here,
// so that gradfix built without LibTorch names a bad option before it says the subcommand needs
// LibTorch, and gradfix hands gradfix-torch only jobs whose options are sound.
#include <algorithm>
#include <cmath>
#include <string>

#include "gradfix/io/error.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {

void InitJob::validate() const {
  require_given(arch, "--arch");
  require_given(out, "--out");
}

void ShotSelection::validate() const {
  if (!indices_file.empty() && num_batches > 0) throw InputError("give --indices or --num-batches, not both");
  if (!features_file.empty() && strategy == "random")
    throw InputError("--selection-features is for --selection coreset, kmedoids or herding; random needs no features");
}

void TrainJob::validate() const {
  require_given(data.spec, "--data");
  require_given(out, "--out");
  if (shots_per_class < 0) throw InputError("--shots-per-class must not be negative");
  if (epochs < 1 || epochs > 1000000 || batch < 1 || !(lr > 0.0) || !std::isfinite(lr))
    throw InputError("gradfix train: --epochs and --batch must be positive and --lr a positive finite number");
  selection.validate();
}

void EvalJob::validate() const { require_given(data.spec, "--data"); }

void SignsJob::validate() const {
  require_given(data.spec, "--data");
  require_given(out, "--out");
  if (num_samples < 0) throw InputError("--num-samples must not be negative");
  selection.validate();
  if (vote_precision == VotePrecision::kBF16 && sign_mode != SignMode::kMax)
    throw InputError("--vote-precision bf16 narrows the products of per-sample votes (--sign-mode max); a mean gradient sums "
                     "magnitudes, which it would round");
  if (vote_precision == VotePrecision::kBF16 && method != VoteMethod::kFast)
    throw InputError("--vote-precision bf16 narrows the fast method's per-sample products; --method loop has none (it asks autograd for "
                     "each sample's gradient)");
}

void TransportJob::validate() const {
  require_given(data.spec, "--data");
  require_given(test.spec, "--test-data");
  if (num_samples < 0) throw InputError("--num-samples must not be negative");
  selection.validate();
  mask.validate();
  if (vote_precision == VotePrecision::kBF16 && sign_mode != SignMode::kMax)
    throw InputError("--vote-precision bf16 narrows the products of per-sample votes (--sign-mode max); a mean gradient sums "
                     "magnitudes, which it would round");
  for (double lr : finetune_lrs)
    if (!(lr > 0.0) || !std::isfinite(lr)) throw InputError("--finetune-lrs: every learning rate must be positive, got " + format_number(lr));
  for (std::size_t i = 0; i < finetune_steps.size(); ++i) {
    if (finetune_steps[i] < 1 || finetune_steps[i] > 1000000)
      throw InputError("--finetune-steps: every step count must be a whole number from 1 to 1000000, got " + std::to_string(finetune_steps[i]));
    if (i > 0 && finetune_steps[i] <= finetune_steps[i - 1])
      throw InputError("--finetune-steps must increase, got " + std::to_string(finetune_steps[i]) + " after " + std::to_string(finetune_steps[i - 1]));
  }
  if (!finetune_freeze.empty() && !few_shot_baseline)
    throw InputError("--finetune-freeze configures the few-shot fine-tuning row, which --no-few-shot-baseline skips");
}

void DemoJob::validate() const {
  if (shots.empty()) throw InputError("--shots is empty");
  for (long long k : shots)
    if (k < 1 || k > 1000) throw InputError("--shots: every K must be a whole number from 1 to 1000, got " + std::to_string(k));
  if (seeds.empty() || seeds.size() > 100) throw InputError("--seeds must be from 1 to 100, got " + std::to_string(seeds.size()));
  if (pretrain_epochs < 1 || pretrain_epochs > 1000 || finetune_epochs < 1 || finetune_epochs > 1000)
    throw InputError("--pretrain-epochs and --finetune-epochs must be from 1 to 1000");
  if (pretrain_limit < 0 || finetune_limit < 1)
    throw InputError("--pretrain-limit must not be negative and --finetune-limit must be positive");
  if (small_support_size < 0) throw InputError("--small-support must not be negative, got " + std::to_string(small_support_size));
  if (transforms.empty()) throw InputError("--transform is empty");
}

void LmDemoJob::validate() const {
  static const std::vector<std::string> kTasks = {"reverse", "parity", "add"};
  if (tasks.empty()) throw InputError("--lm-tasks is empty");
  for (const auto& task : tasks) {
    if (std::find(kTasks.begin(), kTasks.end(), task) == kTasks.end())
      throw InputError("--lm-tasks: unknown task '" + task + "' (reverse, parity or add)");
    if (std::count(tasks.begin(), tasks.end(), task) > 1) throw InputError("--lm-tasks: task '" + task + "' twice");
  }
  if (samples.empty()) throw InputError("--samples is empty");
  for (long long n : samples)
    if (n < 1 || n > pool_samples - support_size)
      throw InputError("--samples: every N must be from 1 to " + std::to_string(pool_samples - support_size) + " (the pool of " +
                       std::to_string(pool_samples) + " less the support set of " + std::to_string(support_size) + "), got " + std::to_string(n));
  if (seeds.empty() || seeds.size() > 100) throw InputError("--seeds must be from 1 to 100, got " + std::to_string(seeds.size()));
  if (pretrain_epochs < 1 || pretrain_epochs > 1000 || finetune_epochs < 1 || finetune_epochs > 1000)
    throw InputError("--pretrain-epochs and --finetune-epochs must be from 1 to 1000");
  if (alphas.empty()) throw InputError("--alphas is empty");
}

}  // namespace gradfix
