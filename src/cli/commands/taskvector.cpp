// gradfix taskvector: its options, and the step from them to its job (the job itself: src/jobs/taskvector.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec taskvector_subcommand() {
  SubcommandSpec spec;
  spec.name = "taskvector";
  spec.usage = "gradfix taskvector --base B --finetuned F --out T";
  spec.summary = "tau = finetuned - base, tensor by tensor";
  spec.groups = {OptionGroup::kOutput};
  spec.options = {{"base", T::kText, "", "pre-trained checkpoint A_base"}, {"finetuned", T::kText, "", "fine-tuned checkpoint A_ft"}};
  spec.prepare = [](const Options& values) {
    const TaskVectorJob job{values.required("base"), values.required("finetuned"), values.required("out"), parse_output(values)};
    return job_of(job, [](const TaskVectorJob& j, std::ostream& log, const JobContext& c) { run_taskvector(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kCheckpoints, taskvector_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
