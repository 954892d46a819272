// gradfix generate: its options, and the step from them to its job (the job itself: src/jobs/generate.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec generate_subcommand() {
  SubcommandSpec spec;
  spec.name = "generate";
  spec.usage = "gradfix generate (--mlp 784,256,10 | --shapes w=4x3,b=4 | --like FILE) --seed S --out FILE";
  spec.summary = "write a synthetic checkpoint (random, or a noisy copy of another) for trials and benchmarks";
  spec.groups = {OptionGroup::kOutput};
  spec.options = {{"mlp", T::kText, "", "layer widths of an MLP: layers.{i}.weight and layers.{i}.bias"},
                  {"shapes", T::kText, "", "tensors as NAME=DIMxDIM,... (e.g. w=256x784,b=256)"},
                  {"dtype", T::kText, "F32", "dtype for --mlp and --shapes"},
                  {"like", T::kText, "", "take the tensors of this checkpoint, scaled by --like-scale"},
                  {"like-scale", T::kNumber, "1", "factor on the --like values"},
                  {"noise", T::kNumber, "1", "standard deviation of the added Gaussian noise"},
                  {"seed", T::kCount, "0", "random seed"}};
  spec.prepare = [](const Options& values) {
    GenerateJob job;
    const std::string dtype_text = values.text("dtype");
    const auto dtype = parse_dtype(dtype_text);
    if (!dtype) throw InputError("unknown --dtype '" + dtype_text + "'");
    if (values.has("mlp") + values.has("shapes") + values.has("like") != 1)
      throw InputError("gradfix generate: give exactly one of --mlp, --shapes and --like");
    if (values.has("mlp")) job.layout = mlp_layout(values.text("mlp"), *dtype);
    if (values.has("shapes")) job.layout = parse_shapes(values.text("shapes"), *dtype);
    if (values.has("like")) job.like = values.text("like");
    job.like_scale = values.number("like-scale");
    job.noise = values.number("noise");
    job.seed = values.count("seed");
    job.out = values.required("out");
    job.output = parse_output(values);
    return job_of(job, [](const GenerateJob& j, std::ostream& log, const JobContext& c) { run_generate(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kCheckpoints, generate_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
