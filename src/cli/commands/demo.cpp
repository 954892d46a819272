// gradfix demo: its options, and the step from them to its job (the job itself: src/model/demo.cpp).
#include <algorithm>
#include <cmath>
#include <sstream>

#include "common.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/selection.hpp"

namespace gradfix {
namespace commands {
namespace {

// The demo's tasks: comma-separated transforms, none empty, none twice.
std::vector<std::string> parse_tasks(const std::string& text) {
  std::vector<std::string> tasks;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    const auto first = item.find_first_not_of(" \t"), last = item.find_last_not_of(" \t");
    if (first == std::string::npos) throw InputError("--transform '" + text + "': an empty task");
    tasks.push_back(item.substr(first, last - first + 1));
    if (std::count(tasks.begin(), tasks.end(), tasks.back()) > 1)
      throw InputError("--transform '" + text + "': task '" + tasks.back() + "' twice");
  }
  if (tasks.empty()) throw InputError("--transform is empty");
  return tasks;
}

// An epoch count as an int; out of int's range: 0, which DemoJob::validate() refuses.
int epochs_of(const Options& values, const std::string& key) {
  const long long epochs = values.integer(key);
  return epochs >= 1 && epochs <= 1000 ? static_cast<int>(epochs) : 0;
}

SubcommandSpec demo_subcommand() {
  SubcommandSpec spec;
  spec.name = "demo";
  spec.usage = "gradfix demo [--quick]";
  spec.summary = "the built-in end-to-end demo on Fashion-MNIST (run by launch/quickstart)";
  spec.executable = Executable::kTorch;
  spec.options = {
      {"quick", T::kFlag, "", "a tiny configuration (smoke test: a few thousand samples, one seed)"},
      {"cache", T::kText, "out/demo", "where trained models are cached"},
      {"data-dir", T::kText, "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files"},
      {"transform", T::kText, "noise:0.5:14,rotate:20,contrast:0.5,blur:3",
       "the tasks: input shifts as for train, comma-separated (one task each)"},
      {"sign-mode", T::kText, "max", "max|mean"},
      {"shared-init", T::kFlag, "", "initialise A and B alike (a model lineage; default: independently, the paper's regime)"},
      {"selection", T::kText, "random", "how the shots are picked: random|coreset|kmedoids|herding (on B's penultimate activations)"},
      {"no-selection-ablation", T::kFlag, "", "skip the table of GradFix under every shot selection strategy"},
      {"no-mask-ablation", T::kFlag, "", "skip the table of GradFix under every mask mode"},
      {"no-merging", T::kFlag, "", "skip the multi-task merging table"},
      {"shots", T::kText, "1,2,5,10", "K values (labelled shots per class), comma-separated: one table each"},
      {"seeds", T::kInteger, "3", "seeds of shot selection per K (0, 1, ...)"},
      {"pretrain-epochs", T::kInteger, "5", "epochs of each release's pre-training"},
      {"pretrain-limit", T::kInteger, "0", "training images per release (0: half the training set each)"},
      {"finetune-epochs", T::kInteger, "2", "epochs of the task fine-tunes of A and B"},
      {"finetune-limit", T::kInteger, "50000",
       "shifted training images of the task fine-tunes (the shots and support set come after them)"},
      {"small-support", T::kInteger, "100", "support set size of the second K = 2 table (a few-shot user's labels); 0 skips it"},
      {"alphas", T::kText, "0.1,0.25,0.5,0.75,1,1.5,2,3,4,5",
       "alpha grid, searched on the support set (wider than transport's: a lazy fine-tune's task vector is short)"},
      {"results", T::kText, "", "results JSON to write"}};
  spec.prepare = [](const Options& values) {
    DemoJob job;
    job.cache = values.text("cache");
    job.data_dir = values.text("data-dir");
    job.transforms = parse_tasks(values.text("transform"));
    job.sign_mode = parse_sign_mode(values.text("sign-mode"));
    job.independent_init = !values.flag("shared-init");
    job.selection = shot_strategy_name(parse_shot_strategy(values.text("selection")));
    job.selection_ablation = !values.flag("no-selection-ablation");
    job.mask_ablation = !values.flag("no-mask-ablation");
    job.merging = !values.flag("no-merging");
    job.alphas = parse_numbers(values.text("alphas"), "alphas");
    job.small_support_size = values.integer("small-support");
    if (values.has("results")) job.results = values.text("results");
    job.shots.clear();
    for (double k : parse_numbers(values.text("shots"), "shots")) {
      // Bounded before the conversion; DemoJob::validate() checks the range too.
      if (k < 1 || k > 1000 || k != std::floor(k))
        throw InputError("--shots: every K must be a whole number from 1 to 1000, got " + format_number(k));
      job.shots.push_back(static_cast<long long>(k));
    }
    const long long seeds = values.integer("seeds");
    // Bounded before the list of seeds is made.
    if (seeds < 1 || seeds > 100) throw InputError("--seeds must be from 1 to 100, got " + std::to_string(seeds));
    job.seeds.clear();
    for (long long seed = 0; seed < seeds; ++seed) job.seeds.push_back(static_cast<std::uint64_t>(seed));
    job.pretrain_epochs = epochs_of(values, "pretrain-epochs");
    job.finetune_epochs = epochs_of(values, "finetune-epochs");
    job.pretrain_limit = values.integer("pretrain-limit");
    job.finetune_limit = values.integer("finetune-limit");
    // The options as given are checked before --quick replaces some of them.
    job.validate();
    if (values.flag("quick")) {
      job.shots = {2};
      job.seeds = {0};
      job.dims = "784,32,10";
      job.pretrain_epochs = 1;
      job.finetune_epochs = 1;
      job.pretrain_limit = 3000;
      job.finetune_limit = 2000;
      job.finetune_lr = 1e-3;
      job.test_limit = 1000;
      job.support_size = 300;
      job.small_support_size = std::min(job.small_support_size, 50LL);
      job.selection_ablation = false;
    }
    return job_of(job, [](const DemoJob& j, std::ostream& log, const JobContext& c) { run_demo(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kRuns, demo_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
