// gradfix transport: its options, and the step from them to its job (the job itself: src/model/jobs.cpp).
#include <cmath>

#include "common.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace commands {
namespace {

// The few-shot fine-tuning grid; TransportJob::validate() checks the values (learning rates > 0,
// step counts increasing).
void parse_finetune_grid(const Options& values, TransportJob& job) {
  if (values.has("finetune-lrs") && !values.text("finetune-lrs").empty())
    job.finetune_lrs = parse_numbers(values.text("finetune-lrs"), "finetune-lrs");
  if (values.has("finetune-steps") && !values.text("finetune-steps").empty())
    for (double steps : parse_numbers(values.text("finetune-steps"), "finetune-steps")) {
      // Bounded before the conversion.
      if (!(steps >= 1.0 && steps <= 1e6) || steps != std::floor(steps))
        throw InputError("--finetune-steps: every step count must be a whole number from 1 to 1000000, got " + std::to_string(steps));
      job.finetune_steps.push_back(static_cast<long long>(steps));
    }
}

SubcommandSpec transport_subcommand() {
  SubcommandSpec spec;
  spec.name = "transport";
  spec.usage = "gradfix transport --config configs/transport.ini";
  spec.summary = "transport a task vector to a new model: GradFix against naive, oracle and few-shot baselines";
  spec.executable = Executable::kTorch;
  spec.groups = {OptionGroup::kModel};
  spec.options =
      joined({{"target", T::kText, "", "target model B (weights)"},
              {"task-vector", T::kText, "", "source task vector tau_A"},
              {"source-base", T::kText, "", "A_base, with --source-finetuned instead of --task-vector"},
              {"source-finetuned", T::kText, "", "A_ft"},
              {"target-finetuned", T::kText, "", "B fine-tuned: enables the oracle and the upper bound"},
              {"data", T::kText, "", "pool of labelled task samples: the shots and the support set"},
              {"test-data", T::kText, "", "test set, read only for the final evaluation"},
              {"transform", T::kText, "none", "input shift of the task (as for train: rotate:30, blur:1.5+noise:0.1, ...)"},
              {"shots-per-class", T::kInteger, "5", "K"},
              {"num-samples", T::kInteger, "0", "decoders: the shots are the first N samples of a seeded shuffle of --data"},
              {"head", T::kText, "", "CLIP: zero-shot head file [classes, projection_dim]"}},
             joined(shot_options(),
                    {{"support-size", T::kInteger, "1000", "support samples for choosing alpha (disjoint from the shots)"},
                     {"seed", T::kCount, "0", "sampling seed"},
                     {"sign-mode", T::kText, "max", "max|mean"},
                     {"vote-precision", T::kText, "f32",
                      "model directories, sign mode max: f32, or bf16 products of the votes (float32 accumulation; faster on "
                      "AMX/AVX512-BF16 CPUs and GPU tensor cores)"},
                     {"mask-mode", T::kText, "normal", "mask rule: " + mask_mode_names()},
                     {"alphas", T::kText, kDefaultAlphaGrid, "alpha grid, searched on the support set"},
                     {"no-few-shot-baseline", T::kFlag, "", "skip the few-shot fine-tuning baseline (and fine-tuning from GradFix)"},
                     {"no-gradfix-finetune", T::kFlag, "",
                      "skip the row that runs the same few-shot fine-tuning from GradFix's transported model"},
                     {"finetune-lrs", T::kText, "",
                      "few-shot fine-tuning: Adam learning rates tried (default: built-in "
                      "classifiers 1e-4,1e-3,1e-2; decoders and CLIP 1e-5,3e-5,1e-4)"},
                     {"finetune-steps", T::kText, "",
                      "few-shot fine-tuning: full-batch steps after which the support "
                      "set is scored, increasing (default 5,20,50)"},
                     {"finetune-freeze", T::kTexts, "",
                      "few-shot fine-tuning of a classifier: regular expression over "
                      "tensor names left frozen (repeatable), e.g. '^layers\\.2\\.' for an MLP's head"},
                     {"save-support", T::kText, "", "classifiers: write the support set's indices here (one per line, as --save-indices)"},
                     {"statistics-cache", T::kText, "",
                      "model directories: keep the few-shot statistics in this directory and "
                      "reuse them when B, the shots and the sign mode are the same (a sweep uses OUT/statistics)"},
                     {"out", T::kText, "", "transported model (GradFix, best alpha) to write"},
                     {"results", T::kText, "", "results.json to write"}}));
  spec.prepare = [](const Options& values) {
    TransportJob job;
    job.model = values.text("model");
    job.target = weights_of(values, "target");
    if (values.has("task-vector")) job.task_vector = values.text("task-vector");
    if (values.has("source-base")) job.source_base = values.text("source-base");
    if (values.has("source-finetuned")) job.source_finetuned = values.text("source-finetuned");
    if (values.has("target-finetuned")) job.target_finetuned = values.text("target-finetuned");
    job.data = data_of(values, "data");
    job.test = data_of(values, "test-data");
    job.shots_per_class = values.integer("shots-per-class");
    job.num_samples = values.integer("num-samples");
    job.selection = selection_of(values);
    job.support_size = values.integer("support-size");
    job.seed = values.count("seed");
    job.sign_mode = parse_sign_mode(values.text("sign-mode"));
    job.vote_precision = parse_vote_precision(values.text("vote-precision"));
    job.mask_mode = parse_mask_mode(values.text("mask-mode"));
    job.alphas = parse_numbers(values.text("alphas"), "alphas");
    job.few_shot_baseline = !values.flag("no-few-shot-baseline");
    job.gradfix_finetune = !values.flag("no-gradfix-finetune");
    parse_finetune_grid(values, job);
    job.finetune_freeze = values.texts("finetune-freeze");
    if (values.has("save-support")) job.save_support = values.text("save-support");
    if (values.has("head")) job.head = values.text("head");
    if (values.has("statistics-cache")) job.statistics_cache = values.text("statistics-cache");
    if (values.has("out")) job.out = values.text("out");
    if (values.has("results")) job.results = values.text("results");
    return job_of(job, [](const TransportJob& j, std::ostream& log, const JobContext& c) { run_transport(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kModels, transport_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
