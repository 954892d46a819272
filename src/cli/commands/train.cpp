// gradfix train: its options, and the step from them to its job (the job itself: src/model/jobs.cpp).
#include "common.hpp"

namespace gradfix {
namespace commands {
namespace {

SubcommandSpec train_subcommand() {
  SubcommandSpec spec;
  spec.name = "train";
  spec.usage = "gradfix train --weights W --data D --epochs E --lr LR --out W2";
  spec.summary = "train a model with Adam (pre-training, fine-tuning)";
  spec.executable = Executable::kTorch;
  spec.groups = {OptionGroup::kModel};
  spec.options = joined(joined(data_options(), shot_options()),
                        {{"epochs", T::kInteger, "1", "passes over the data"},
                         {"lr", T::kNumber, "0.001", "Adam learning rate"},
                         {"batch", T::kInteger, "128", "batch size"},
                         {"skip", T::kInteger, "0", "skip the first N samples"},
                         {"limit", T::kInteger, "0", "use at most N samples (0: all)"},
                         {"seed", T::kCount, "0", "shuffling seed (and the shots' seed)"},
                         {"shots-per-class", T::kInteger, "0", "few-shot fine-tuning: train on K samples per class only (0: all)"},
                         {"freeze", T::kTexts, "",
                          "regular expression over tensor names (repeatable): matching tensors are not updated, e.g. --freeze "
                          "'^layers\\.2\\.' for an MLP's head"},
                         {"out", T::kText, "", "trained weights to write"}});
  spec.prepare = [](const Options& values) {
    TrainJob job;
    job.model = values.text("model");
    job.weights = weights_of(values, "weights");
    job.data = data_of(values, "data");
    // Out of int's range: 0, which validate() refuses as it refuses any count below 1.
    const long long epochs = values.integer("epochs");
    job.epochs = epochs >= 1 && epochs <= 1000000 ? static_cast<int>(epochs) : 0;
    job.lr = values.number("lr");
    job.batch = values.integer("batch");
    job.skip = values.integer("skip");
    job.limit = values.integer("limit");
    job.seed = values.count("seed");
    job.out = values.required("out");
    job.shots_per_class = values.integer("shots-per-class");
    job.selection = selection_of(values);
    job.freeze = values.texts("freeze");
    return job_of(job, [](const TrainJob& j, std::ostream& log, const JobContext& c) { run_train(j, log, c); });
  };
  return spec;
}

const SubcommandRegistration kRegistration(HelpSection::kModels, train_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
