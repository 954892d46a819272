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

// The demo's tasks: comma-separated names, none empty, none twice.
std::vector<std::string> parse_tasks(const std::string& text, const std::string& option) {
  std::vector<std::string> tasks;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    const auto first = item.find_first_not_of(" \t"), last = item.find_last_not_of(" \t");
    if (first == std::string::npos) throw InputError(option + " '" + text + "': an empty task");
    tasks.push_back(item.substr(first, last - first + 1));
    if (std::count(tasks.begin(), tasks.end(), tasks.back()) > 1)
      throw InputError(option + " '" + text + "': task '" + tasks.back() + "' twice");
  }
  if (tasks.empty()) throw InputError(option + " is empty");
  return tasks;
}

// An epoch count as an int; out of int's range: 0, which DemoJob::validate() refuses.
int epochs_of(const Options& values, const std::string& key) {
  const long long epochs = values.integer(key);
  return epochs >= 1 && epochs <= 1000 ? static_cast<int>(epochs) : 0;
}

// The options only one of the two demos reads (and whether each is a flag): given to the other
// demo, they are refused by name.
const std::vector<std::pair<std::string, bool>> kVisionOnly = {
    {"data-dir", false},  {"transform", false},       {"shared-init", true},    {"selection", false},     {"no-selection-ablation", true},
    {"no-merging", true}, {"shots", false},           {"pretrain-limit", false}, {"finetune-limit", false}, {"small-support", false}};
const std::vector<std::pair<std::string, bool>> kLanguageOnly = {{"samples", false}, {"lm-tasks", false}};

void refuse_options_of_other_demo(const Options& values, bool lm) {
  for (const auto& [name, is_flag] : lm ? kVisionOnly : kLanguageOnly)
    if (is_flag ? values.flag(name) : values.has(name))
      throw InputError("gradfix demo" + std::string(lm ? " --lm" : "") + ": --" + name + " applies to " +
                       (lm ? "the vision demo (without --lm)" : "the language-model demo (--lm)"));
}

// Whole numbers from 1 to 1000, for --shots and --samples.
std::vector<long long> parse_counts(const Options& values, const std::string& key) {
  std::vector<long long> counts;
  for (double k : parse_numbers(values.text(key), key)) {
    // Bounded before the conversion; the jobs' validate() checks their own ranges too.
    if (k < 1 || k > 1000 || k != std::floor(k)) throw InputError("--" + key + ": every value must be a whole number from 1 to 1000, got " + format_number(k));
    counts.push_back(static_cast<long long>(k));
  }
  return counts;
}

std::vector<std::uint64_t> parse_seeds(const Options& values) {
  const long long seeds = values.integer("seeds");
  // Bounded before the list of seeds is made.
  if (seeds < 1 || seeds > 100) throw InputError("--seeds must be from 1 to 100, got " + std::to_string(seeds));
  std::vector<std::uint64_t> list;
  for (long long seed = 0; seed < seeds; ++seed) list.push_back(static_cast<std::uint64_t>(seed));
  return list;
}

PreparedJob prepare_lm_demo(const Options& values) {
  LmDemoJob job;
  if (values.has("cache")) job.cache = values.text("cache");
  if (values.has("lm-tasks")) job.tasks = parse_tasks(values.text("lm-tasks"), "--lm-tasks");
  if (values.has("samples")) job.samples = parse_counts(values, "samples");
  job.seeds = parse_seeds(values);
  job.sign_mode = parse_sign_mode(values.text("sign-mode"));
  if (values.has("alphas")) job.alphas = parse_numbers(values.text("alphas"), "alphas");
  if (values.has("pretrain-epochs")) job.pretrain_epochs = epochs_of(values, "pretrain-epochs");
  if (values.has("finetune-epochs")) job.finetune_epochs = epochs_of(values, "finetune-epochs");
  job.mask_ablation = !values.flag("no-mask-ablation");
  if (values.has("results")) job.results = values.text("results");
  // The options as given are checked before --quick replaces some of them.
  job.validate();
  if (values.flag("quick")) {
    // About a minute on two cores: smaller corpora and fine-tunes, the middle N, one seed.
    job.samples = {16};
    job.seeds = {0};
    job.pretrain_epochs = 2;
    job.pretrain_samples = 2048;
    job.finetune_epochs = 2;
    job.finetune_lr = 2e-3;
    job.finetune_steps = {5};
    job.finetune_lrs = {3e-3};
    job.alphas = {0.1, 0.5, 1, 2};
    job.test_samples = 256;
  }
  return job_of(job, [](const LmDemoJob& j, std::ostream& log, const JobContext& c) { run_lm_demo(j, log, c); });
}

PreparedJob prepare_vision_demo(const Options& values) {
  DemoJob job;
  if (values.has("cache")) job.cache = values.text("cache");
  if (values.has("data-dir")) job.data_dir = values.text("data-dir");
  if (values.has("transform")) job.transforms = parse_tasks(values.text("transform"), "--transform");
  job.sign_mode = parse_sign_mode(values.text("sign-mode"));
  job.independent_init = !values.flag("shared-init");
  if (values.has("selection")) job.selection = shot_strategy_name(parse_shot_strategy(values.text("selection")));
  job.selection_ablation = !values.flag("no-selection-ablation");
  job.mask_ablation = !values.flag("no-mask-ablation");
  job.merging = !values.flag("no-merging");
  if (values.has("alphas")) job.alphas = parse_numbers(values.text("alphas"), "alphas");
  if (values.has("small-support")) job.small_support_size = values.integer("small-support");
  if (values.has("results")) job.results = values.text("results");
  if (values.has("shots")) job.shots = parse_counts(values, "shots");
  job.seeds = parse_seeds(values);
  if (values.has("pretrain-epochs")) job.pretrain_epochs = epochs_of(values, "pretrain-epochs");
  if (values.has("finetune-epochs")) job.finetune_epochs = epochs_of(values, "finetune-epochs");
  if (values.has("pretrain-limit")) job.pretrain_limit = values.integer("pretrain-limit");
  if (values.has("finetune-limit")) job.finetune_limit = values.integer("finetune-limit");
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
}

SubcommandSpec demo_subcommand() {
  SubcommandSpec spec;
  spec.name = "demo";
  spec.usage = "gradfix demo [--lm] [--quick]";
  spec.summary = "the built-in end-to-end demos: Fashion-MNIST (run by launch/quickstart), or a small language model with --lm";
  spec.executable = Executable::kTorch;
  spec.options = {
      {"lm", T::kFlag, "", "the language-model demo: two releases of a small Llama pretrained here, three tasks, transport at N samples"},
      {"quick", T::kFlag, "", "a tiny configuration (smoke test: a few thousand samples, one seed)"},
      {"cache", T::kText, "", "where trained models are cached (default out/demo; with --lm out/demo-lm)"},
      {"data-dir", T::kText, "", "Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)"},
      {"transform", T::kText, "",
       "the tasks: input shifts as for train, comma-separated (one task each; default noise:0.5:14,rotate:20,contrast:0.5,blur:3)"},
      {"lm-tasks", T::kText, "", "--lm: the tasks, comma-separated from reverse, parity, add (default all three)"},
      {"samples", T::kText, "", "--lm: N values (labelled samples per transport), comma-separated: one table each (default 8,16,32)"},
      {"sign-mode", T::kText, "max", "max|mean"},
      {"shared-init", T::kFlag, "", "initialise A and B alike (a model lineage; default: independently, the paper's regime)"},
      {"selection", T::kText, "", "how the shots are picked: random|coreset|kmedoids|herding (on B's penultimate activations; default random)"},
      {"no-selection-ablation", T::kFlag, "", "skip the table of GradFix under every shot selection strategy"},
      {"no-mask-ablation", T::kFlag, "", "skip the table of GradFix under every mask mode (--lm: force and random)"},
      {"no-merging", T::kFlag, "", "skip the multi-task merging table"},
      {"shots", T::kText, "", "K values (labelled shots per class), comma-separated: one table each (default 1,2,5,10)"},
      {"seeds", T::kInteger, "3", "seeds of shot selection per K or N (0, 1, ...)"},
      {"pretrain-epochs", T::kInteger, "", "epochs of each release's pre-training (default 5; --lm 4)"},
      {"pretrain-limit", T::kInteger, "", "training images per release (default 0: half the training set each)"},
      {"finetune-epochs", T::kInteger, "", "epochs of the task fine-tunes of A and B (default 2; --lm 4)"},
      {"finetune-limit", T::kInteger, "",
       "shifted training images of the task fine-tunes (the shots and support set come after them; default 50000)"},
      {"small-support", T::kInteger, "", "support set size of the second K = 2 table (a few-shot user's labels; default 100); 0 skips it"},
      {"alphas", T::kText, "",
       "alpha grid, searched on the support set (default 0.1,0.25,0.5,0.75,1,1.5,2,3,4,5; --lm 0.05,0.1,0.25,0.5,1,1.5,2,3)"},
      {"results", T::kText, "", "results JSON to write"}};
  spec.prepare = [](const Options& values) {
    const bool lm = values.flag("lm");
    refuse_options_of_other_demo(values, lm);
    return lm ? prepare_lm_demo(values) : prepare_vision_demo(values);
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kRuns, demo_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
