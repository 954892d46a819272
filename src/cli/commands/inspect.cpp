// gradfix inspect: its options, and the step from them to its job (the job itself: src/jobs/inspect.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec inspect_subcommand() {
  SubcommandSpec spec;
  spec.name = "inspect";
  spec.usage = "gradfix inspect FILE [OTHER] [options]";
  spec.summary = "list tensors, dtypes, shapes and bytes; with OTHER, per-tensor sign agreement and cosine";
  spec.options = {{"file", T::kText, "", "checkpoint to list (positional)"},
                  {"other", T::kText, "", "second checkpoint to compare with (positional)"},
                  {"include", T::kTexts, "", "only tensors matching this regex (repeatable)"},
                  {"exclude", T::kTexts, "", "leave out tensors matching this regex (repeatable)"},
                  {"json", T::kText, "", "also write the report as JSON to this file"}};
  spec.positional = {"file", "other"};
  spec.prepare = [](const Options& values) {
    InspectJob job;
    job.file = values.required("file");
    if (values.has("other")) job.other = values.text("other");
    job.include = values.texts("include");
    job.exclude = values.texts("exclude");
    if (values.has("json")) job.json_out = values.text("json");
    return job_of(job, [](const InspectJob& j, std::ostream& log, const JobContext& c) { run_inspect(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kCheckpoints, inspect_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
