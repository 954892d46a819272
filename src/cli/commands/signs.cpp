// gradfix signs: its options, and the step from them to its job (the job itself: src/model/jobs.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec signs_subcommand() {
  SubcommandSpec spec;
  spec.name = "signs";
  spec.usage = "gradfix signs --weights W --data D --shots-per-class K --sign-mode max|mean --out S";
  spec.summary = "few-shot gradient-sign statistics of a model (vote counts or summed -gradients)";
  spec.executable = Executable::kTorch;
  spec.groups = {OptionGroup::kModel};
  spec.options = joined(
      joined(data_options(), {{"shots-per-class", T::kInteger, "5", "K labelled samples per class, drawn with --seed"},
                              {"num-samples", T::kInteger, "0", "decoders: the first N samples of a seeded shuffle (0: every sample)"}}),
      joined(shot_options(), {{"seed", T::kCount, "0", "sampling seed"},
                              {"sign-mode", T::kText, "max", "max: per-sample vote counts; mean: summed -gradients"},
                              {"method", T::kText, "fast", "fast: one batched backward pass; loop: one backward per sample"},
                              {"vote-precision", T::kText, "f32",
                               "model directories, sign mode max: f32, or bf16 products of the votes (float32 accumulation; "
                               "faster on AMX/AVX512-BF16 CPUs and GPU tensor cores)"},
                              {"head", T::kText, "", "CLIP: zero-shot head file [classes, projection_dim]"},
                              {"out", T::kText, "", "statistics file to write"}}));
  spec.prepare = [](const Options& values) {
    SignsJob job;
    job.model = values.text("model");
    job.weights = weights_of(values, "weights");
    job.data = data_of(values, "data");
    job.shots_per_class = values.integer("shots-per-class");
    job.num_samples = values.integer("num-samples");
    job.selection = selection_of(values);
    job.seed = values.count("seed");
    job.sign_mode = parse_sign_mode(values.text("sign-mode"));
    job.method = parse_vote_method(values.text("method"));
    job.vote_precision = parse_vote_precision(values.text("vote-precision"));
    if (values.has("head")) job.head = values.text("head");
    job.out = values.required("out");
    return job_of(job, [](const SignsJob& j, std::ostream& log, const JobContext& c) { run_signs(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kModels, signs_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
