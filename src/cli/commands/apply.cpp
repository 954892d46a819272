// gradfix apply: its options, and the step from them to its job (the job itself: src/jobs/apply.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec apply_subcommand() {
  SubcommandSpec spec;
  spec.name = "apply";
  spec.usage = "gradfix apply --base B --task-vector T --alpha A --out OUT";
  spec.summary = "write base + alpha * tau";
  spec.groups = {OptionGroup::kOutput};
  spec.options = {{"base", T::kText, "", "checkpoint to add the task vector to"},
                  {"task-vector", T::kText, "", "task vector (may cover a subset of the base's tensors)"},
                  {"alpha", T::kNumber, "1", "scaling coefficient"}};
  spec.prepare = [](const Options& values) {
    const ApplyJob job{values.required("base"), values.required("task-vector"), values.number("alpha"), values.required("out"),
                       parse_output(values)};
    return job_of(job, [](const ApplyJob& j, std::ostream& log, const JobContext& c) { run_apply(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kCheckpoints, apply_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
