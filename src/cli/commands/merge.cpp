// gradfix merge: its options, and the step from them to its job (the job itself: src/jobs/merge.cpp
// and, for a mergekit configuration, src/jobs/model_merge.cpp).
#include "common.hpp"
#include "gradfix/cli/mergekit.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec merge_subcommand() {
  SubcommandSpec spec;
  spec.name = "merge";
  spec.usage =
      "gradfix merge --task-vector T1 --task-vector T2 [...] --method mean|sum|ties --out M\n"
      "       gradfix merge --config MERGE.yml --out DIR    (a mergekit configuration: whole models in, the merged model out)";
  spec.summary = "merge task vectors, optionally masking before or after";
  spec.groups = {OptionGroup::kOutput, OptionGroup::kMask};
  spec.options = {{"task-vector", T::kTexts, "", "task vector (repeat for each)"},
                  {"signs", T::kTexts, "", "statistics of each task vector, in the same order (with --order)"},
                  {"method", T::kText, "mean", "mean|sum|ties"},
                  {"ties-fraction", T::kNumber, "0.2", "TIES: fraction of largest magnitudes kept"},
                  {"ties-elect", T::kText, "", "TIES sign election: count|mass (default: count; mass with --ties-variant mergekit)"},
                  {"ties-scope", T::kText, "tensor", "TIES trim scope: tensor|global"},
                  {"ties-variant", T::kText, "gradfix", "TIES rules: gradfix|mergekit (docs/merging.md)"},
                  {"order", T::kText, "none", "none|mask-then-merge|merge-then-mask"}};
  spec.prepare = [](const Options& values) {
    // A mergekit YAML configuration: whole models in, the merged model out.
    if (values.has("config") && is_yaml_path(values.text("config"))) {
      if (values.has("task-vector") || values.has("signs"))
        throw InputError("gradfix merge: --config MERGE.yml names the models; --task-vector and --signs do not go with it");
      ModelMergeJob job = mergekit_job(values.text("config"));
      job.out = values.required("out");
      // The command line's output options; the configuration's dtype unless --out-dtype.
      OutputOptions output = parse_output(values);
      if (!output.out_dtype) output.out_dtype = job.output.out_dtype;
      job.output = output;
      return job_of(job, [](const ModelMergeJob& j, std::ostream& log, const JobContext& c) { run_model_merge(j, log, c); });
    }
    MergeJob job;
    job.task_vectors = values.texts("task-vector");
    job.signs = values.texts("signs");
    job.method = parse_merge_method(values.text("method"));
    job.ties.fraction = values.number("ties-fraction");
    job.ties.variant = parse_ties_variant(values.text("ties-variant"));
    const bool mergekit = job.ties.variant == TiesVariant::kMergekit;
    job.ties.elect =
        values.has("ties-elect") ? parse_ties_elect(values.text("ties-elect")) : (mergekit ? TiesElect::kMass : TiesElect::kCount);
    job.ties.scope = parse_ties_scope(values.text("ties-scope"));
    job.order = parse_merge_order(values.text("order"));
    job.mode = parse_mask_mode(values.text("mask-mode"));
    job.mask = parse_mask_options(values);
    job.out = values.required("out");
    job.output = parse_output(values);
    return job_of(job, [](const MergeJob& j, std::ostream& log, const JobContext& c) { run_merge(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kCheckpoints, merge_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
