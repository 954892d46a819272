// gradfix eval: its options, and the step from them to its job (the job itself: src/model/jobs.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec eval_subcommand() {
  SubcommandSpec spec;
  spec.name = "eval";
  spec.usage = "gradfix eval --weights W --data D [--results R.json]";
  spec.summary = "accuracy and loss of a model on a dataset (decoders: per-sample loss and token accuracy)";
  spec.executable = Executable::kTorch;
  spec.groups = {OptionGroup::kModel};
  spec.options = joined(data_options(), {{"results", T::kText, "", "also write the results as JSON to this file"},
                                         {"head", T::kText, "", "CLIP: zero-shot head file [classes, projection_dim]"}});
  spec.prepare = [](const Options& values) {
    EvalJob job{values.text("model"), weights_of(values, "weights"), data_of(values, "data"), "", ""};
    if (values.has("results")) job.results = values.text("results");
    if (values.has("head")) job.head = values.text("head");
    return job_of(job, [](const EvalJob& j, std::ostream& log, const JobContext& c) { run_eval(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kModels, eval_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
