// gradfix init: its options, and the step from them to its job (the job itself: src/model/jobs.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec init_subcommand() {
  SubcommandSpec spec;
  spec.name = "init";
  spec.usage = "gradfix init --arch mlp --dims 784,256,10 --seed S --out W.safetensors  |  --arch llama --config-file C.json --out DIR";
  spec.summary = "create the weights of a built-in model";
  spec.executable = Executable::kTorch;
  spec.options = {
      {"arch", T::kText, "mlp", "architecture: mlp|cnn|vit, or a decoder's model_type with --config-file (docs/models.md lists them)"},
      {"dims", T::kText, "", "mlp layer widths, input first: 784,256,10 (cnn and vit: docs/cli.md)"},
      {"config-file", T::kText, "", "decoders: the config.json to initialise from (docs/models.md)"},
      {"seed", T::kCount, "0", "initialisation seed"},
      {"out", T::kText, "", "weights file to write (decoders: a model directory)"},
      strict_config_option()};
  spec.prepare = [](const Options& values) {
    InitJob job{values.text("arch"), values.has("dims") ? values.text("dims") : "", "", values.count("seed"), values.required("out")};
    if (values.has("config-file")) job.config = values.text("config-file");
    return job_of(job, [](const InitJob& j, std::ostream& log, const JobContext& c) { run_init(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kModels, init_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
