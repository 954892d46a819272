// gradfix mask: its options, and the step from them to its job (the job itself: src/jobs/mask.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec mask_subcommand() {
  SubcommandSpec spec;
  spec.name = "mask";
  spec.usage = "gradfix mask --task-vector T --signs S --mask-mode MODE --out M";
  spec.summary = "mask a task vector with gradient-sign statistics";
  spec.groups = {OptionGroup::kOutput, OptionGroup::kMask};
  spec.options = {
      {"task-vector", T::kText, "", "task vector to mask"},
      {"signs", T::kText, "",
       "statistics along the descent direction: signs, vote counts or summed -gradients (for oracle: the target's own task vector)"}};
  spec.prepare = [](const Options& values) {
    MaskJob job;
    job.task_vector = values.required("task-vector");
    job.signs = values.required("signs");
    job.mode = parse_mask_mode(values.text("mask-mode"));
    job.mask = parse_mask_options(values);
    job.out = values.required("out");
    job.output = parse_output(values);
    return job_of(job, [](const MaskJob& j, std::ostream& log, const JobContext& c) { run_mask(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kCheckpoints, mask_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
