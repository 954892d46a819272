// gradfix convert: its options, and the step from them to its job (the job itself: src/jobs/convert.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec convert_subcommand() {
  SubcommandSpec spec;
  spec.name = "convert";
  spec.usage = "gradfix convert IN OUT [--out-dtype D]";
  spec.summary = "re-pack a checkpoint: safetensors <-> HDF5, single file <-> shards, dtype changes";
  spec.groups = {OptionGroup::kOutput};
  spec.options = {{"in", T::kText, "", "checkpoint to read (positional)"}};
  spec.positional = {"in", "out"};
  spec.prepare = [](const Options& values) {
    const ConvertJob job{values.required("in"), values.required("out"), parse_output(values)};
    return job_of(job, [](const ConvertJob& j, std::ostream& log, const JobContext& c) { run_convert(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kCheckpoints, convert_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
