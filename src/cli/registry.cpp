// The table of subcommands: options and the step from parsed options to a typed job.
#include "gradfix/cli/registry.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <sstream>

#include "gradfix/cli/cli.hpp"
#include "gradfix/cli/mergekit.hpp"
#include "gradfix/cli/sweep.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/selection.hpp"
#include "gradfix/model/jobs.hpp"
#include "gradfix/jobs/jobs.hpp"

namespace gradfix {
namespace {

using T = OptionType;

OutputOptions parse_output(const Options& values) {
  OutputOptions output;
  output.include = values.texts("include");
  output.exclude = values.texts("exclude");
  if (values.has("out-dtype")) {
    const std::string text = values.text("out-dtype");
    const auto dtype = parse_float_dtype(text);
    if (!dtype)
      throw InputError("unknown --out-dtype '" + escaped_name(text) +
                       "'; valid: F64, F32, F16, BF16, F8_E4M3, F8_E5M2 (or PyTorch's names: float32, bfloat16, ...); "
                       "integer tensors keep their dtype");
    output.out_dtype = *dtype;
  }
  output.allow_nonfinite = values.flag("allow-nonfinite");
  output.force = values.flag("force");
  output.max_shard_bytes = parse_byte_size(values.text("max-shard-size"), "--max-shard-size");
  return output;
}

MaskOptions parse_mask_options(const Options& values) {
  MaskOptions mask;
  mask.beta = values.number("beta");
  mask.gamma = values.number("gamma");
  mask.c = values.number("soft-c");
  mask.seed = values.count("seed");
  for (const char* key : {"beta", "gamma", "soft-c"})
    if (!std::isfinite(values.number(key))) throw InputError(std::string("--") + key + " must be finite");
  // soft3 divides by |g| + c: a c of zero or below divides by zero where |g| = c's negative.
  if (!(mask.c > 0.0)) throw InputError("--soft-c must be positive, got " + std::to_string(mask.c));
  const std::string input = values.text("soft-input");
  if (input != "sign" && input != "raw") throw InputError("unknown --soft-input '" + input + "'; valid: sign|raw");
  mask.raw_soft_input = input == "raw";
  return mask;
}

// A comma-separated list of finite numbers given as --`key`.
std::vector<double> parse_numbers(const std::string& text, const std::string& key) {
  std::vector<double> numbers;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    // Blanks around an item are allowed, as in "0.5, 1, 2".
    const auto first = item.find_first_not_of(" \t"), last = item.find_last_not_of(" \t");
    numbers.push_back(parse_number(key, first == std::string::npos ? "" : item.substr(first, last - first + 1)));
    if (!std::isfinite(numbers.back())) throw InputError("--" + key + ": every value must be finite, got '" + item + "'");
  }
  if (numbers.empty()) throw InputError("--" + key + " is empty");
  return numbers;
}

std::vector<double> parse_alphas(const std::string& text) { return parse_numbers(text, "alphas"); }

// The demo's tasks: comma-separated transforms, none empty, none twice.
std::vector<std::string> parse_tasks(const std::string& text) {
  std::vector<std::string> tasks;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    const auto first = item.find_first_not_of(" \t"), last = item.find_last_not_of(" \t");
    if (first == std::string::npos) throw InputError("--transform '" + text + "': an empty task");
    tasks.push_back(item.substr(first, last - first + 1));
    if (std::count(tasks.begin(), tasks.end(), tasks.back()) > 1) throw InputError("--transform '" + text + "': task '" + tasks.back() + "' twice");
  }
  if (tasks.empty()) throw InputError("--transform is empty");
  return tasks;
}

// The few-shot fine-tuning grid: learning rates > 0, step counts >= 1 (in increasing order: the
// support set is scored after each on one run per learning rate).
void parse_finetune_grid(const Options& values, TransportJob& job) {
  if (values.has("finetune-lrs") && !values.text("finetune-lrs").empty()) {
    job.finetune_lrs = parse_numbers(values.text("finetune-lrs"), "finetune-lrs");
    for (double lr : job.finetune_lrs)
      if (!(lr > 0.0)) throw InputError("--finetune-lrs: every learning rate must be positive, got " + format_number(lr));
  }
  if (values.has("finetune-steps") && !values.text("finetune-steps").empty()) {
    for (double steps : parse_numbers(values.text("finetune-steps"), "finetune-steps")) {
      if (!(steps >= 1.0 && steps <= 1e6) || steps != std::floor(steps))
        throw InputError("--finetune-steps: every step count must be a whole number from 1 to 1000000, got " + std::to_string(steps));
      if (!job.finetune_steps.empty() && steps <= static_cast<double>(job.finetune_steps.back()))
        throw InputError("--finetune-steps must increase, got " + std::to_string(static_cast<long long>(steps)) + " after " +
                         std::to_string(job.finetune_steps.back()));
      job.finetune_steps.push_back(static_cast<long long>(steps));
    }
  }
}

SignMode checked_sign_mode(const Options& values) { return parse_sign_mode(values.text("sign-mode")); }

// Shared by the model subcommands and init (which reads a decoder's config.json too).
const OptionSpec kStrictConfig = {"strict-config", T::kFlag, "",
                                  "refuse config.json keys gradfix does not know (default: name them in a notice and go on; keys that "
                                  "change the math are always read or refused)"};

// A TorchScript archive may carry its own parameters: then the weights are optional.
std::string weights_of(const Options& values, const std::string& key) {
  const bool torchscript = values.text("model").rfind("torchscript:", 0) == 0;
  return torchscript && !values.has(key) ? std::string() : values.required(key);
}

DataOptions data_of(const Options& values, const std::string& key) { return DataOptions{values.required(key), values.text("transform")}; }

ShotSelection selection_of(const Options& values) {
  ShotSelection selection;
  if (values.has("indices")) selection.indices_file = values.text("indices");
  selection.num_batches = values.integer("num-batches");
  selection.batch_size = values.integer("batch-size");
  if (!selection.indices_file.empty() && selection.num_batches > 0) throw InputError("give --indices or --num-batches, not both");
  selection.strategy = shot_strategy_name(parse_shot_strategy(values.text("selection")));
  if (values.has("selection-features")) selection.features_file = values.text("selection-features");
  if (values.has("save-indices")) selection.save_indices = values.text("save-indices");
  if (!selection.features_file.empty() && selection.strategy == "random")
    throw InputError("--selection-features is for --selection coreset, kmedoids or herding; random needs no features");
  return selection;
}

// Wraps a job function and its typed job into a PreparedJob.
template <typename Job, typename Run>
PreparedJob job_of(Job job, Run run) {
  return [job, run](std::ostream& log, const JobContext& context) { run(job, log, context); };
}

const std::vector<OptionSpec> kShotOptions = {
    {"indices", T::kText, "", "use exactly these samples: a file of indices (instead of --shots-per-class)"},
    {"num-batches", T::kInteger, "0", "use the first N batches of a seeded shuffle (instead of --shots-per-class)"},
    {"batch-size", T::kInteger, "32", "batch size for --num-batches"},
    {"selection", T::kText, "random", "how the K shots per class are picked: random|coreset|kmedoids|herding (docs/cli.md)"},
    {"selection-features", T::kText, "", "features [N, D] for coreset|kmedoids|herding (default: the model's own embedding)"},
    {"save-indices", T::kText, "", "write the chosen shots' indices here (the format --indices reads)"},
};

std::vector<OptionSpec> joined(std::vector<OptionSpec> first, const std::vector<OptionSpec>& second) {
  first.insert(first.end(), second.begin(), second.end());
  return first;
}

std::vector<SubcommandSpec> make_table() {
  std::vector<SubcommandSpec> table;

  table.push_back({"inspect", "gradfix inspect FILE [OTHER] [options]",
                   "list tensors, dtypes, shapes and bytes; with OTHER, per-tensor sign agreement and cosine", Executable::kGradfix, {},
                   {{"file", T::kText, "", "checkpoint to list (positional)"},
                    {"other", T::kText, "", "second checkpoint to compare with (positional)"},
                    {"include", T::kTexts, "", "only tensors matching this regex (repeatable)"},
                    {"exclude", T::kTexts, "", "leave out tensors matching this regex (repeatable)"},
                    {"json", T::kText, "", "also write the report as JSON to this file"}},
                   {"file", "other"},
                   [](const Options& values) {
                     InspectJob job;
                     job.file = values.required("file");
                     if (values.has("other")) job.other = values.text("other");
                     job.include = values.texts("include");
                     job.exclude = values.texts("exclude");
                     if (values.has("json")) job.json_out = values.text("json");
                     return job_of(job, [](const InspectJob& j, std::ostream& log, const JobContext& c) { run_inspect(j, log, c); });
                   }});

  table.push_back({"taskvector", "gradfix taskvector --base B --finetuned F --out T", "tau = finetuned - base, tensor by tensor",
                   Executable::kGradfix, {OptionGroup::kOutput},
                   {{"base", T::kText, "", "pre-trained checkpoint A_base"}, {"finetuned", T::kText, "", "fine-tuned checkpoint A_ft"}},
                   {},
                   [](const Options& values) {
                     const TaskVectorJob job{values.required("base"), values.required("finetuned"), values.required("out"), parse_output(values)};
                     return job_of(job, [](const TaskVectorJob& j, std::ostream& log, const JobContext& c) { run_taskvector(j, log, c); });
                   }});

  table.push_back({"mask", "gradfix mask --task-vector T --signs S --mask-mode MODE --out M",
                   "mask a task vector with gradient-sign statistics", Executable::kGradfix, {OptionGroup::kOutput, OptionGroup::kMask},
                   {{"task-vector", T::kText, "", "task vector to mask"},
                    {"signs", T::kText, "",
                     "statistics along the descent direction: signs, vote counts or summed -gradients (for oracle: the target's own task vector)"}},
                   {},
                   [](const Options& values) {
                     MaskJob job;
                     job.task_vector = values.required("task-vector");
                     job.signs = values.required("signs");
                     job.mode = parse_mask_mode(values.text("mask-mode"));
                     job.mask = parse_mask_options(values);
                     job.out = values.required("out");
                     job.output = parse_output(values);
                     return job_of(job, [](const MaskJob& j, std::ostream& log, const JobContext& c) { run_mask(j, log, c); });
                   }});

  table.push_back({"merge", "gradfix merge --task-vector T1 --task-vector T2 [...] --method mean|sum|ties --out M\n"
                   "       gradfix merge --config MERGE.yml --out DIR    (a mergekit configuration: whole models in, the merged model out)",
                   "merge task vectors, optionally masking before or after", Executable::kGradfix,
                   {OptionGroup::kOutput, OptionGroup::kMask},
                   {{"task-vector", T::kTexts, "", "task vector (repeat for each)"},
                    {"signs", T::kTexts, "", "statistics of each task vector, in the same order (with --order)"},
                    {"method", T::kText, "mean", "mean|sum|ties"},
                    {"ties-fraction", T::kNumber, "0.2", "TIES: fraction of largest magnitudes kept"},
                    {"ties-elect", T::kText, "", "TIES sign election: count|mass (default: count; mass with --ties-variant mergekit)"},
                    {"ties-scope", T::kText, "tensor", "TIES trim scope: tensor|global"},
                    {"ties-variant", T::kText, "gradfix", "TIES rules: gradfix|mergekit (docs/merging.md)"},
                    {"order", T::kText, "none", "none|mask-then-merge|merge-then-mask"}},
                   {},
                   [](const Options& values) {
                     // A mergekit YAML configuration: whole models in, the merged model out.
                     if (values.has("config") && is_yaml_path(values.text("config"))) {
                       if (values.has("task-vector") || values.has("signs"))
                         throw InputError("gradfix merge: --config MERGE.yml names the models; --task-vector and --signs do not go with it");
                       ModelMergeJob job = mergekit_job(values.text("config"));
                       job.out = values.required("out");
                       // The command line's output options; the configuration's dtype unless --out-dtype.
                       OutputOptions output = parse_output(values);
                       if (!output.out_dtype) output.out_dtype = job.output.out_dtype;
                       job.output = output;
                       return job_of(job, [](const ModelMergeJob& j, std::ostream& log, const JobContext& c) { run_model_merge(j, log, c); });
                     }
                     MergeJob job;
                     job.task_vectors = values.texts("task-vector");
                     job.signs = values.texts("signs");
                     job.method = parse_merge_method(values.text("method"));
                     job.ties.fraction = values.number("ties-fraction");
                     job.ties.variant = parse_ties_variant(values.text("ties-variant"));
                     const bool mergekit = job.ties.variant == TiesVariant::kMergekit;
                     job.ties.elect = values.has("ties-elect") ? parse_ties_elect(values.text("ties-elect"))
                                                               : (mergekit ? TiesElect::kMass : TiesElect::kCount);
                     job.ties.scope = parse_ties_scope(values.text("ties-scope"));
                     job.order = parse_merge_order(values.text("order"));
                     job.mode = parse_mask_mode(values.text("mask-mode"));
                     job.mask = parse_mask_options(values);
                     job.out = values.required("out");
                     job.output = parse_output(values);
                     return job_of(job, [](const MergeJob& j, std::ostream& log, const JobContext& c) { run_merge(j, log, c); });
                   }});

  table.push_back({"apply", "gradfix apply --base B --task-vector T --alpha A --out OUT", "write base + alpha * tau",
                   Executable::kGradfix, {OptionGroup::kOutput},
                   {{"base", T::kText, "", "checkpoint to add the task vector to"},
                    {"task-vector", T::kText, "", "task vector (may cover a subset of the base's tensors)"},
                    {"alpha", T::kNumber, "1", "scaling coefficient"}},
                   {},
                   [](const Options& values) {
                     const ApplyJob job{values.required("base"), values.required("task-vector"), values.number("alpha"), values.required("out"),
                                        parse_output(values)};
                     return job_of(job, [](const ApplyJob& j, std::ostream& log, const JobContext& c) { run_apply(j, log, c); });
                   }});

  table.push_back({"generate", "gradfix generate (--mlp 784,256,10 | --shapes w=4x3,b=4 | --like FILE) --seed S --out FILE",
                   "write a synthetic checkpoint (random, or a noisy copy of another) for trials and benchmarks", Executable::kGradfix,
                   {OptionGroup::kOutput},
                   {{"mlp", T::kText, "", "layer widths of an MLP: layers.{i}.weight and layers.{i}.bias"},
                    {"shapes", T::kText, "", "tensors as NAME=DIMxDIM,... (e.g. w=256x784,b=256)"},
                    {"dtype", T::kText, "F32", "dtype for --mlp and --shapes"},
                    {"like", T::kText, "", "take the tensors of this checkpoint, scaled by --like-scale"},
                    {"like-scale", T::kNumber, "1", "factor on the --like values"},
                    {"noise", T::kNumber, "1", "standard deviation of the added Gaussian noise"},
                    {"seed", T::kCount, "0", "random seed"}},
                   {},
                   [](const Options& values) {
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
                   }});

  table.push_back({"convert", "gradfix convert IN OUT [--out-dtype D]",
                   "re-pack a checkpoint: safetensors <-> HDF5, single file <-> shards, dtype changes", Executable::kGradfix,
                   {OptionGroup::kOutput},
                   {{"in", T::kText, "", "checkpoint to read (positional)"}},
                   {"in", "out"},
                   [](const Options& values) {
                     const ConvertJob job{values.required("in"), values.required("out"), parse_output(values)};
                     return job_of(job, [](const ConvertJob& j, std::ostream& log, const JobContext& c) { run_convert(j, log, c); });
                   }});

  table.push_back({"init", "gradfix init --arch mlp --dims 784,256,10 --seed S --out W.safetensors  |  --arch llama --config-file C.json --out DIR",
                   "create the weights of a built-in model", Executable::kTorch, {},
                   {{"arch", T::kText, "mlp", "architecture: mlp|cnn|vit, or a decoder's model_type with --config-file (docs/models.md lists them)"},
                    {"dims", T::kText, "", "mlp layer widths, input first: 784,256,10 (cnn and vit: docs/cli.md)"},
                    {"config-file", T::kText, "", "decoders: the config.json to initialise from (docs/models.md)"},
                    {"seed", T::kCount, "0", "initialisation seed"},
                    {"out", T::kText, "", "weights file to write (decoders: a model directory)"},
                    kStrictConfig},
                   {},
                   [](const Options& values) {
                     InitJob job{values.text("arch"), values.has("dims") ? values.text("dims") : "", "", values.count("seed"), values.required("out")};
                     if (values.has("config-file")) job.config = values.text("config-file");
                     return job_of(job, [](const InitJob& j, std::ostream& log, const JobContext& c) { run_init(j, log, c); });
                   }});

  const std::vector<OptionSpec> data_options = {
      {"weights", T::kText, "", "model weights, or a Hugging Face model directory (for torchscript: optional, replacing the archive's parameters by name)"},
      {"data", T::kText, "", "dataset: FILE.h5 (inputs, labels), an IDX '*-images-idx3-ubyte[.gz]' file, or DIR:SPLIT"},
      {"transform", T::kText, "none", "input shift applied to the data: none|invert|rotate90|rotate:DEG|blur:SIGMA|contrast:F|noise:SIGMA, joined by +"}};

  table.push_back({"train", "gradfix train --weights W --data D --epochs E --lr LR --out W2",
                   "train a model with Adam (pre-training, fine-tuning)", Executable::kTorch, {OptionGroup::kModel},
                   joined(joined(data_options, kShotOptions), {{"epochs", T::kInteger, "1", "passes over the data"},
                                         {"lr", T::kNumber, "0.001", "Adam learning rate"},
                                         {"batch", T::kInteger, "128", "batch size"},
                                         {"skip", T::kInteger, "0", "skip the first N samples"},
                                         {"limit", T::kInteger, "0", "use at most N samples (0: all)"},
                                         {"seed", T::kCount, "0", "shuffling seed (and the shots' seed)"},
                                         {"shots-per-class", T::kInteger, "0", "few-shot fine-tuning: train on K samples per class only (0: all)"},
                                         {"freeze", T::kTexts, "", "regular expression over tensor names (repeatable): matching tensors are not updated, e.g. --freeze '^layers\\.2\\.' for an MLP's head"},
                                         {"out", T::kText, "", "trained weights to write"}}),
                   {},
                   [](const Options& values) {
                     TrainJob job;
                     job.model = values.text("model");
                     job.weights = weights_of(values, "weights");
                     job.data = data_of(values, "data");
                     job.epochs = static_cast<int>(values.integer("epochs"));
                     job.lr = values.number("lr");
                     job.batch = values.integer("batch");
                     job.skip = values.integer("skip");
                     job.limit = values.integer("limit");
                     job.seed = values.count("seed");
                     job.out = values.required("out");
                     job.shots_per_class = values.integer("shots-per-class");
                     if (job.shots_per_class < 0) throw InputError("--shots-per-class must not be negative");
                     job.selection = selection_of(values);
                     job.freeze = values.texts("freeze");
                     if (values.integer("epochs") < 1 || values.integer("epochs") > 1000000 || job.batch < 1 || !(job.lr > 0.0) ||
                         !std::isfinite(job.lr))
                       throw InputError("gradfix train: --epochs and --batch must be positive and --lr a positive finite number");
                     return job_of(job, [](const TrainJob& j, std::ostream& log, const JobContext& c) { run_train(j, log, c); });
                   }});

  table.push_back({"eval", "gradfix eval --weights W --data D [--results R.json]",
                   "accuracy and loss of a model on a dataset (decoders: per-sample loss and token accuracy)", Executable::kTorch,
                   {OptionGroup::kModel},
                   joined(data_options, {{"results", T::kText, "", "also write the results as JSON to this file"},
                                         {"head", T::kText, "", "CLIP: zero-shot head file [classes, projection_dim]"}}),
                   {},
                   [](const Options& values) {
                     EvalJob job{values.text("model"), weights_of(values, "weights"), data_of(values, "data"), "", ""};
                     if (values.has("results")) job.results = values.text("results");
                     if (values.has("head")) job.head = values.text("head");
                     return job_of(job, [](const EvalJob& j, std::ostream& log, const JobContext& c) { run_eval(j, log, c); });
                   }});

  table.push_back({"signs", "gradfix signs --weights W --data D --shots-per-class K --sign-mode max|mean --out S",
                   "few-shot gradient-sign statistics of a model (vote counts or summed -gradients)", Executable::kTorch,
                   {OptionGroup::kModel},
                   joined(joined(data_options, {{"shots-per-class", T::kInteger, "5", "K labelled samples per class, drawn with --seed"},
                                                {"num-samples", T::kInteger, "0", "decoders: the first N samples of a seeded shuffle (0: every sample)"}}),
                          joined(kShotOptions,
                                 {{"seed", T::kCount, "0", "sampling seed"},
                                  {"sign-mode", T::kText, "max", "max: per-sample vote counts; mean: summed -gradients"},
                                  {"method", T::kText, "fast", "fast: one batched backward pass; loop: one backward per sample"},
                                  {"head", T::kText, "", "CLIP: zero-shot head file [classes, projection_dim]"},
                                  {"out", T::kText, "", "statistics file to write"}})),
                   {},
                   [](const Options& values) {
                     SignsJob job;
                     job.model = values.text("model");
                     job.weights = weights_of(values, "weights");
                     job.data = data_of(values, "data");
                     job.shots_per_class = values.integer("shots-per-class");
                     job.num_samples = values.integer("num-samples");
                     if (job.num_samples < 0) throw InputError("--num-samples must not be negative");
                     job.selection = selection_of(values);
                     job.seed = values.count("seed");
                     job.sign_mode = checked_sign_mode(values);
                     job.method = parse_vote_method(values.text("method"));
                     if (values.has("head")) job.head = values.text("head");
                     job.out = values.required("out");
                     return job_of(job, [](const SignsJob& j, std::ostream& log, const JobContext& c) { run_signs(j, log, c); });
                   }});

  table.push_back({"transport", "gradfix transport --config configs/transport.ini",
                   "transport a task vector to a new model: GradFix against naive, oracle and few-shot baselines", Executable::kTorch,
                   {OptionGroup::kModel},
                   joined({{"target", T::kText, "", "target model B (weights)"},
                           {"task-vector", T::kText, "", "source task vector tau_A"},
                           {"source-base", T::kText, "", "A_base, with --source-finetuned instead of --task-vector"},
                           {"source-finetuned", T::kText, "", "A_ft"},
                           {"target-finetuned", T::kText, "", "B fine-tuned: enables the oracle and the upper bound"},
                           {"data", T::kText, "", "pool of labelled task samples: the shots and the support set"},
                           {"test-data", T::kText, "", "test set, read only for the final evaluation"},
                           {"transform", T::kText, "none", "input shift of the task (as for train: rotate:30, blur:1.5+noise:0.1, ...)"},
                           {"shots-per-class", T::kInteger, "5", "K"},
                           {"num-samples", T::kInteger, "0", "decoders: the shots are the first N samples of a seeded shuffle of --data"},
                           {"head", T::kText, "", "CLIP: zero-shot head file [classes, projection_dim]"}},
                          joined(kShotOptions,
                                 {{"support-size", T::kInteger, "1000", "support samples for choosing alpha (disjoint from the shots)"},
                                  {"seed", T::kCount, "0", "sampling seed"},
                                  {"sign-mode", T::kText, "max", "max|mean"},
                                  {"mask-mode", T::kText, "normal", "mask rule: " + mask_mode_names()},
                                  {"alphas", T::kText, kDefaultAlphaGrid, "alpha grid, searched on the support set"},
                                  {"no-few-shot-baseline", T::kFlag, "", "skip the few-shot fine-tuning baseline"},
                                  {"finetune-lrs", T::kText, "", "few-shot fine-tuning: Adam learning rates tried (default: built-in "
                                                                 "classifiers 1e-4,1e-3,1e-2; decoders and CLIP 1e-5,3e-5,1e-4)"},
                                  {"finetune-steps", T::kText, "", "few-shot fine-tuning: full-batch steps after which the support "
                                                                   "set is scored, increasing (default 5,20,50)"},
                                  {"finetune-freeze", T::kTexts, "", "few-shot fine-tuning of a classifier: regular expression over "
                                                                     "tensor names left frozen (repeatable), e.g. '^layers\\.2\\.' for an MLP's head"},
                                  {"save-support", T::kText, "", "classifiers: write the support set's indices here (one per line, as --save-indices)"},
                                  {"statistics-cache", T::kText, "", "model directories: keep the few-shot statistics in this directory and "
                                                                     "reuse them when B, the shots and the sign mode are the same (a sweep uses OUT/statistics)"},
                                  {"out", T::kText, "", "transported model (GradFix, best alpha) to write"},
                                  {"results", T::kText, "", "results.json to write"}})),
                   {},
                   [](const Options& values) {
                     TransportJob job;
                     job.model = values.text("model");
                     job.target = weights_of(values, "target");
                     if (values.has("task-vector")) job.task_vector = values.text("task-vector");
                     if (values.has("source-base")) job.source_base = values.text("source-base");
                     if (values.has("source-finetuned")) job.source_finetuned = values.text("source-finetuned");
                     if (values.has("target-finetuned")) job.target_finetuned = values.text("target-finetuned");
                     job.data = data_of(values, "data");
                     job.test = data_of(values, "test-data");
                     job.shots_per_class = values.integer("shots-per-class");
                     job.num_samples = values.integer("num-samples");
                     if (job.num_samples < 0) throw InputError("--num-samples must not be negative");
                     job.selection = selection_of(values);
                     job.support_size = values.integer("support-size");
                     job.seed = values.count("seed");
                     job.sign_mode = checked_sign_mode(values);
                     job.mask_mode = parse_mask_mode(values.text("mask-mode"));
                     job.alphas = parse_alphas(values.text("alphas"));
                     job.few_shot_baseline = !values.flag("no-few-shot-baseline");
                     parse_finetune_grid(values, job);
                     job.finetune_freeze = values.texts("finetune-freeze");
                     if (values.has("save-support")) job.save_support = values.text("save-support");
                     if (!job.finetune_freeze.empty() && !job.few_shot_baseline)
                       throw InputError("--finetune-freeze configures the few-shot fine-tuning row, which --no-few-shot-baseline skips");
                     if (values.has("head")) job.head = values.text("head");
                     if (values.has("statistics-cache")) job.statistics_cache = values.text("statistics-cache");
                     if (values.has("out")) job.out = values.text("out");
                     if (values.has("results")) job.results = values.text("results");
                     return job_of(job, [](const TransportJob& j, std::ostream& log, const JobContext& c) { run_transport(j, log, c); });
                   }});

  table.push_back({"demo", "gradfix demo [--quick]", "the built-in end-to-end demo on Fashion-MNIST (run by launch/quickstart)",
                   Executable::kTorch, {},
                   {{"quick", T::kFlag, "", "a tiny configuration (smoke test: a few thousand samples, one seed)"},
                    {"cache", T::kText, "out/demo", "where trained models are cached"},
                    {"data-dir", T::kText, "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files"},
                    {"transform", T::kText, "noise:0.5:14,rotate:20,contrast:0.5,blur:3",
                     "the tasks: input shifts as for train, comma-separated (one task each)"},
                    {"sign-mode", T::kText, "max", "max|mean"},
                    {"shared-init", T::kFlag, "", "initialise A and B alike (a model lineage; default: independently, the paper's regime)"},
                    {"selection", T::kText, "random", "how the shots are picked: random|coreset|kmedoids|herding (on B's penultimate activations)"},
                    {"no-selection-ablation", T::kFlag, "", "skip the table of GradFix under every shot selection strategy"},
                    {"no-mask-ablation", T::kFlag, "", "skip the table of GradFix under every mask mode"},
                    {"no-merging", T::kFlag, "", "skip the multi-task merging table"},
                    {"shots", T::kText, "1,2,5,10", "K values (labelled shots per class), comma-separated: one table each"},
                    {"seeds", T::kInteger, "3", "seeds of shot selection per K (0, 1, ...)"},
                    {"pretrain-epochs", T::kInteger, "5", "epochs of each release's pre-training"},
                    {"pretrain-limit", T::kInteger, "0", "training images per release (0: half the training set each)"},
                    {"finetune-epochs", T::kInteger, "2", "epochs of the task fine-tunes of A and B"},
                    {"finetune-limit", T::kInteger, "50000", "shifted training images of the task fine-tunes (the shots and support set come after them)"},
                    {"small-support", T::kInteger, "100", "support set size of the second K = 2 table (a few-shot user's labels); 0 skips it"},
                    {"alphas", T::kText, "0.1,0.25,0.5,0.75,1,1.5,2,3,4,5",
                     "alpha grid, searched on the support set (wider than transport's: a lazy fine-tune's task vector is short)"},
                    {"results", T::kText, "", "results JSON to write"}},
                   {},
                   [](const Options& values) {
                     DemoJob job;
                     job.cache = values.text("cache");
                     job.data_dir = values.text("data-dir");
                     job.transforms = parse_tasks(values.text("transform"));
                     job.sign_mode = checked_sign_mode(values);
                     job.independent_init = !values.flag("shared-init");
                     job.selection = shot_strategy_name(parse_shot_strategy(values.text("selection")));
                     job.selection_ablation = !values.flag("no-selection-ablation");
                     job.mask_ablation = !values.flag("no-mask-ablation");
                     job.merging = !values.flag("no-merging");
                     job.alphas = parse_alphas(values.text("alphas"));
                     job.small_support_size = values.integer("small-support");
                     if (job.small_support_size < 0) throw InputError("--small-support must not be negative, got " + std::to_string(job.small_support_size));
                     if (values.has("results")) job.results = values.text("results");
                     job.shots.clear();
                     for (double k : parse_numbers(values.text("shots"), "shots")) {
                       if (k < 1 || k > 1000 || k != std::floor(k)) throw InputError("--shots: every K must be a whole number from 1 to 1000, got " + format_number(k));
                       job.shots.push_back(static_cast<long long>(k));
                     }
                     const long long seeds = values.integer("seeds");
                     if (seeds < 1 || seeds > 100) throw InputError("--seeds must be from 1 to 100, got " + std::to_string(seeds));
                     job.seeds.clear();
                     for (long long seed = 0; seed < seeds; ++seed) job.seeds.push_back(static_cast<std::uint64_t>(seed));
                     const long long pretrain_epochs = values.integer("pretrain-epochs"), finetune_epochs = values.integer("finetune-epochs");
                     if (pretrain_epochs < 1 || pretrain_epochs > 1000 || finetune_epochs < 1 || finetune_epochs > 1000)
                       throw InputError("--pretrain-epochs and --finetune-epochs must be from 1 to 1000");
                     job.pretrain_epochs = static_cast<int>(pretrain_epochs);
                     job.finetune_epochs = static_cast<int>(finetune_epochs);
                     job.pretrain_limit = values.integer("pretrain-limit");
                     job.finetune_limit = values.integer("finetune-limit");
                     if (job.pretrain_limit < 0 || job.finetune_limit < 1)
                       throw InputError("--pretrain-limit must not be negative and --finetune-limit must be positive");
                     if (values.flag("quick")) {
                       job.shots = {2};
                       job.seeds = {0};
                       job.dims = "784,32,10";
                       job.pretrain_epochs = 1;
                       job.finetune_epochs = 1;
                       job.pretrain_limit = 3000;
                       job.finetune_limit = 2000;
                       job.finetune_lr = 1e-3;
                       job.test_limit = 1000;
                       job.support_size = 300;
                       job.small_support_size = std::min(job.small_support_size, 50LL);
                       job.selection_ablation = false;
                     }
                     return job_of(job, [](const DemoJob& j, std::ostream& log, const JobContext& c) { run_demo(j, log, c); });
                   }});

  SubcommandSpec sweep{
      "sweep", "gradfix sweep --config SWEEP.ini [--point I | --list | --count | --collect] [--set SECTION.KEY=VALUE]",
      "a grid of transports (tasks x shots x seeds x modes) from one INI file, resumable; one table", Executable::kTorch,
      {OptionGroup::kModel},
      {{"point", T::kInteger, "-1", "run only point I (0-based; a Slurm array task: --point $SLURM_ARRAY_TASK_ID)"},
       {"list", T::kFlag, "", "print every point: index, done or pending, name"},
       {"count", T::kFlag, "", "print the number of points (to size a job array)"},
       {"collect", T::kFlag, "", "only gather the finished points into OUT/table.md and OUT/results.csv"},
       {"set", T::kTexts, "", "override a key of the file: SECTION.KEY=VALUE, e.g. sweep.seed=0 (repeatable)"}},
      {},
      [](const Options& values) {
        SweepJob job;
        if (!values.has("config") || values.text("config").empty()) throw InputError("gradfix sweep: --config SWEEP.ini is required");
        job.config = values.text("config");
        job.overrides = values.texts("set");
        job.point = values.integer("point");
        if (job.point < -1) throw InputError("--point must be 0 or more, got " + std::to_string(job.point));
        job.list = values.flag("list");
        job.count = values.flag("count");
        job.collect = values.flag("collect");
        if (static_cast<int>(job.list) + static_cast<int>(job.count) + static_cast<int>(job.collect) + static_cast<int>(job.point >= 0) > 1)
          throw InputError("give one of --point, --list, --count and --collect");
        return job_of(job, [](const SweepJob& j, std::ostream& log, const JobContext& c) {
          run_sweep(j, log, c, [](const std::vector<std::string>& args, std::ostream& point_log, const JobContext& context) {
            PreparedJob point;
            context.agree([&] { point = prepare_subcommand(args); });
            point(point_log, context);
          });
        });
      }};
  sweep.config_is_input = true;
  table.push_back(sweep);
  return table;
}

}  // namespace

const std::vector<OptionSpec>& group_options(OptionGroup group) {
  static const std::vector<OptionSpec> kGeneral = {
      {"help", T::kFlag, "", "show this help"},
      {"config", T::kText, "", "INI file of options (top-level keys and a [SUBCOMMAND] section); flags win"},
      {"backend", T::kText, "auto", "communicator for statistics: auto|mpi|nccl (auto: nccl when tensors are on CUDA devices, else mpi)"},
      {"chunk-elements", T::kInteger, "4194304", "elements per processing buffer (bounds memory per rank)"},
      {"report-memory", T::kFlag, "", "print each rank's peak resident memory at the end"},
      {"report-time", T::kFlag, "", "print each rank's wall time and the time it waited on weight gathers and statistics reductions at the end"},
      {"quiet", T::kFlag, "", "no progress lines (rank 0 reports tensors and bytes done, rate and time left on stderr)"},
      {"timeout", T::kNumber, "900", "seconds a rank waits in one collective before it stops the job, naming the ranks that stopped answering (0: wait forever)"}};
  static const std::vector<OptionSpec> kOutput = {
      {"out", T::kText, "", "output: FILE.safetensors, FILE.h5 / FILE.hdf5, or a directory for a sharded safetensors checkpoint"},
      {"out-dtype", T::kText, "", "dtype of the written float tensors: F64, F32, F16, BF16, F8_E4M3, F8_E5M2 (or float32, bfloat16, ...); integer tensors keep theirs. Default: the primary input's (task vectors: F32, F64 from F64 inputs; merges: the widest input's)"},
      {"include", T::kTexts, "", "act only on tensors whose name matches this regex (repeatable)"},
      {"exclude", T::kTexts, "", "leave out tensors whose name matches this regex (repeatable)"},
      {"allow-nonfinite", T::kFlag, "", "accept NaN and Inf in inputs instead of failing"},
      {"max-shard-size", T::kText, "5GB", "largest shard of a sharded safetensors output"},
      {"force", T::kFlag, "", "replace an existing output directory even if it is not a checkpoint (it must hold regular files only)"}};
  static const std::vector<OptionSpec> kMask = {
      {"mask-mode", T::kText, "normal", "mask rule: " + mask_mode_names()},
      {"beta", T::kNumber, "5", "soft1 sharpness"},
      {"gamma", T::kNumber, "1", "soft2 sharpness"},
      {"soft-c", T::kNumber, "1", "soft3 constant c in |g| / (|g| + c)"},
      {"soft-input", T::kText, "sign", "soft modes use sign(s) (as the official GradFix code) or the raw statistic: sign|raw"},
      {"seed", T::kCount, "0", "seed of the random mode"}};
  static const std::vector<OptionSpec> kModel = {
      {"model", T::kText, "builtin", "builtin (architecture from the weights' metadata) or torchscript:ARCHIVE"},
      {"device", T::kText, "cpu", "cpu, cuda (the GPU of this rank on its node) or cuda:N"},
      kStrictConfig};
  switch (group) {
    case OptionGroup::kGeneral: return kGeneral;
    case OptionGroup::kOutput: return kOutput;
    case OptionGroup::kMask: return kMask;
    case OptionGroup::kModel: return kModel;
  }
  GRADFIX_CHECK(false, "unknown option group");
}

const std::vector<SubcommandSpec>& subcommands() {
  static const std::vector<SubcommandSpec> table = make_table();
  return table;
}

const SubcommandSpec* find_subcommand(const std::string& name) {
  for (const auto& subcommand : subcommands())
    if (subcommand.name == name) return &subcommand;
  return nullptr;
}

std::vector<OptionSpec> all_options(const SubcommandSpec& subcommand) {
  std::vector<OptionSpec> options = group_options(OptionGroup::kGeneral);
  for (OptionGroup group : subcommand.groups)
    for (const auto& option : group_options(group)) options.push_back(option);
  for (const auto& option : subcommand.options) options.push_back(option);
  return options;
}

}  // namespace gradfix
