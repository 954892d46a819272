#include "gradfix/cli/cli.hpp"

#include <boost/program_options.hpp>
#include <cctype>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "gradfix/comm/backend.hpp"
#include "gradfix/core/error.hpp"
#include "gradfix/model/jobs.hpp"
#include "gradfix/pipeline/jobs.hpp"

namespace gradfix {
namespace po = boost::program_options;

namespace {

constexpr const char* kVersion = "0.1.0";

struct Subcommand {
  const char* name;
  const char* usage;
  const char* summary;
};

constexpr Subcommand kSubcommands[] = {
    {"inspect", "gradfix inspect FILE [OTHER] [options]",
     "list tensors, dtypes, shapes and bytes; with OTHER, per-tensor sign agreement and cosine"},
    {"taskvector", "gradfix taskvector --base B --finetuned F --out T", "tau = finetuned - base, tensor by tensor"},
    {"mask", "gradfix mask --task-vector T --signs S --mask-mode MODE --out M",
     "mask a task vector with gradient-sign statistics"},
    {"merge", "gradfix merge --task-vector T1 --task-vector T2 [...] --method mean|sum|ties --out M",
     "merge task vectors, optionally masking before or after"},
    {"apply", "gradfix apply --base B --task-vector T --alpha A --out OUT", "write base + alpha * tau"},
    {"generate", "gradfix generate (--mlp 784,256,10 | --shapes w=4x3,b=4 | --like FILE) --seed S --out FILE",
     "write a synthetic checkpoint (random, or a noisy copy of another) for trials and benchmarks"},
    {"init", "gradfix init --arch mlp --dims 784,256,10 --seed S --out W.safetensors", "create the weights of a built-in model"},
    {"train", "gradfix train --weights W --data D --epochs E --lr LR --out W2", "train a model with Adam (pre-training, fine-tuning)"},
    {"eval", "gradfix eval --weights W --data D", "accuracy and loss of a model on a dataset"},
    {"signs", "gradfix signs --weights W --data D --shots-per-class K --sign-mode max|mean --out S",
     "few-shot gradient-sign statistics of a model (vote counts or summed -gradients)"},
    {"transport", "gradfix transport --config configs/transport.ini",
     "transport a task vector to a new model: GradFix against naive, oracle and few-shot baselines"},
    {"demo", "gradfix demo [--quick]", "the built-in end-to-end demo on Fashion-MNIST (run by launch/quickstart)"},
    {"convert", "gradfix convert IN OUT [--out-dtype D]",
     "re-pack a checkpoint: safetensors <-> HDF5, single file <-> shards, dtype changes"},
};

std::string trim(const std::string& text) {
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";
  const auto last = text.find_last_not_of(" \t\r\n");
  return text.substr(first, last - first + 1);
}

// Reads `key = value` lines of an INI file: top-level keys, and keys in the [subcommand]
// section. Other sections belong to other subcommands and are skipped.
std::vector<std::pair<std::string, std::string>> read_config(const std::string& path, const std::string& subcommand) {
  std::ifstream file(path);
  if (!file) throw InputError(path + ": cannot open config file");
  std::vector<std::pair<std::string, std::string>> entries;
  std::string line, section;
  int number = 0;
  while (std::getline(file, line)) {
    ++number;
    line = trim(line);
    if (line.empty() || line[0] == '#' || line[0] == ';') continue;
    if (line.front() == '[') {
      if (line.back() != ']') throw InputError(path + ":" + std::to_string(number) + ": malformed section '" + line + "'");
      section = trim(line.substr(1, line.size() - 2));
      continue;
    }
    const auto equals = line.find('=');
    if (equals == std::string::npos)
      throw InputError(path + ":" + std::to_string(number) + ": expected 'key = value', got '" + line + "'");
    if (!section.empty() && section != subcommand) continue;
    entries.emplace_back(trim(line.substr(0, equals)), trim(line.substr(equals + 1)));
  }
  return entries;
}

// Finds --config on the command line, without parsing anything else yet.
std::string config_path(const std::vector<std::string>& args) {
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--config" && i + 1 < args.size()) return args[i + 1];
    if (args[i].rfind("--config=", 0) == 0) return args[i].substr(9);
  }
  return "";
}

bool given_on_command_line(const std::vector<std::string>& args, const std::string& key) {
  for (const auto& arg : args)
    if (arg == "--" + key || arg.rfind("--" + key + "=", 0) == 0) return true;
  return false;
}

// The command line with the config file's entries appended, except for keys the command line
// already sets: flags win, and a repeated option on the command line replaces the file's list.
std::vector<std::string> with_config(const std::vector<std::string>& args, const std::string& subcommand,
                                     const po::options_description& options) {
  const std::string path = config_path(args);
  if (path.empty()) return args;
  std::vector<std::string> merged = args;
  for (const auto& [key, value] : read_config(path, subcommand)) {
    if (options.find_nothrow(key, false) == nullptr)
      throw InputError(path + ": option '" + key + "' is not an option of 'gradfix " + subcommand + "'");
    if (key == "config") continue;
    if (given_on_command_line(args, key)) continue;
    merged.push_back("--" + key + "=" + value);
  }
  return merged;
}

po::options_description output_options() {
  po::options_description options("Output");
  options.add_options()
      ("out", po::value<std::string>(), "output: FILE.safetensors, FILE.h5 / FILE.hdf5, or a directory for a sharded safetensors checkpoint")
      ("out-dtype", po::value<std::string>(), "dtype of the written tensors (F32, F16, BF16, F64, ...); default: that of the primary input")
      ("include", po::value<std::vector<std::string>>()->composing(), "act only on tensors whose name matches this regex (repeatable)")
      ("exclude", po::value<std::vector<std::string>>()->composing(), "leave out tensors whose name matches this regex (repeatable)")
      ("allow-nonfinite", po::bool_switch(), "accept NaN and Inf in inputs instead of failing")
      ("max-shard-size", po::value<std::string>()->default_value("5GB"), "largest shard of a sharded safetensors output");
  return options;
}

po::options_description mask_options() {
  po::options_description options("Masking");
  options.add_options()
      ("mask-mode", po::value<std::string>()->default_value("normal"), ("mask rule: " + mask_mode_names()).c_str())
      ("beta", po::value<double>()->default_value(5.0), "soft1 sharpness")
      ("gamma", po::value<double>()->default_value(1.0), "soft2 sharpness")
      ("soft-c", po::value<double>()->default_value(1.0), "soft3 constant c in |g| / (|g| + c)")
      ("soft-input", po::value<std::string>()->default_value("sign"), "soft modes use sign(s) (as the official GradFix code) or the raw statistic: sign|raw")
      ("seed", po::value<unsigned long long>()->default_value(0), "seed of the random mode");
  return options;
}

po::options_description general_options() {
  po::options_description options("General");
  options.add_options()
      ("help,h", "show this help")
      ("config", po::value<std::string>(), "INI file of options (top-level keys and a [SUBCOMMAND] section); flags win")
      ("backend", po::value<std::string>()->default_value("auto"), "communicator for statistics: auto|mpi|nccl (auto: nccl when tensors are on CUDA devices, else mpi)")
      ("chunk-elements", po::value<long long>()->default_value(1LL << 22), "elements per processing buffer (bounds memory per rank)")
      ("report-memory", po::bool_switch(), "print each rank's peak resident memory at the end");
  return options;
}

const std::string& require(const po::variables_map& values, const char* key, const std::string& subcommand) {
  if (!values.count(key)) throw InputError("gradfix " + subcommand + ": --" + key + " is required");
  return values[key].as<std::string>();
}

std::vector<std::string> strings(const po::variables_map& values, const char* key) {
  return values.count(key) ? values[key].as<std::vector<std::string>>() : std::vector<std::string>{};
}

OutputOptions parse_output(const po::variables_map& values) {
  OutputOptions output;
  output.include = strings(values, "include");
  output.exclude = strings(values, "exclude");
  if (values.count("out-dtype")) {
    const std::string text = values["out-dtype"].as<std::string>();
    std::string upper;
    for (char c : text) upper += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    const auto dtype = parse_dtype(upper);
    if (!dtype) throw InputError("unknown --out-dtype '" + text + "'; valid: F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL");
    output.out_dtype = *dtype;
  }
  output.allow_nonfinite = values["allow-nonfinite"].as<bool>();
  output.max_shard_bytes = parse_byte_size(values["max-shard-size"].as<std::string>(), "--max-shard-size");
  return output;
}

MaskOptions parse_mask_options(const po::variables_map& values) {
  MaskOptions mask;
  mask.beta = values["beta"].as<double>();
  mask.gamma = values["gamma"].as<double>();
  mask.c = values["soft-c"].as<double>();
  mask.seed = values["seed"].as<unsigned long long>();
  for (const char* key : {"beta", "gamma", "soft-c"})
    if (!std::isfinite(values[key].as<double>())) throw InputError(std::string("--") + key + " must be finite");
  const std::string input = values["soft-input"].as<std::string>();
  if (input != "sign" && input != "raw") throw InputError("unknown --soft-input '" + input + "'; valid: sign|raw");
  mask.raw_soft_input = input == "raw";
  return mask;
}

// Peak resident memory (VmHWM) of this process, in KiB.
long long peak_resident_kib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6));
  return -1;
}

void print_peak_memory(MpiCommunicator* host, std::ostream& out) {
  const long long mine = peak_resident_kib();
  std::vector<long long> all(1, mine);
  if (host != nullptr && host->size() > 1) {
    all.resize(static_cast<std::size_t>(host->size()));
    host->allgather(&mine, all.data(), 1, DType::kI64);
  }
  out << "peak resident memory per rank (MiB):";
  for (long long kib : all) out << " " << kib / 1024;
  out << "\n";
}

void print_overview(std::ostream& out) {
  out << "gradfix " << kVersion << ": transport and merge task vectors with gradient-sign masks\n\n"
      << "usage: gradfix SUBCOMMAND [options]   (gradfix SUBCOMMAND --help for its options)\n\n";
  for (const auto& subcommand : kSubcommands) {
    std::string name = subcommand.name;
    name.resize(12, ' ');
    out << "  " << name << subcommand.summary << "\n";
  }
  out << "\nExit codes: 0 success, 2 bad input, 3 runtime failure. Docs: docs/cli.md\n";
}

std::function<int()> prepare_model_subcommand(const std::string& subcommand, const po::variables_map& values, std::ostream& out,
                                              const JobContext& context, std::shared_ptr<Communicator> stats);

// The job to run after parsing: the work, then the memory report when asked for. It holds the
// statistics communicator, so that it lives as long as the job.
std::function<int()> as_job(std::function<void()> work, std::shared_ptr<Communicator> stats, MpiCommunicator* host,
                            std::ostream& out, bool report_memory) {
  return [work, stats, host, &out, report_memory] {
    work();
    if (report_memory) print_peak_memory(host, out);
    return 0;
  };
}

// Parses the command line and returns the job to run, or a job that prints help.
std::function<int()> prepare_subcommand(const std::vector<std::string>& args, std::ostream& out, MpiRuntime* runtime,
                                        JobContext context);

}  // namespace

long long parse_byte_size(const std::string& text, const std::string& option) {
  std::size_t consumed = 0;
  double number = 0.0;
  try {
    number = std::stod(text, &consumed);
  } catch (const std::exception&) {
    throw InputError(option + ": '" + text + "' is not a size (examples: 5GB, 512MiB, 1000000)");
  }
  std::string unit = trim(text.substr(consumed));
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::map<std::string, double> kUnits = {
      {"", 1.0},      {"B", 1.0},           {"KB", 1e3},          {"MB", 1e6},          {"GB", 1e9},
      {"TB", 1e12},   {"KIB", 1024.0},      {"MIB", 1048576.0},   {"GIB", 1073741824.0}, {"TIB", 1099511627776.0},
      {"K", 1024.0},  {"M", 1048576.0},     {"G", 1073741824.0},  {"T", 1099511627776.0}};
  const auto found = kUnits.find(unit);
  if (found == kUnits.end() || !(number > 0.0) || !std::isfinite(number))
    throw InputError(option + ": '" + text + "' is not a positive size (examples: 5GB, 512MiB, 1000000)");
  return static_cast<long long>(number * found->second);
}

int run_command_line(const std::vector<std::string>& args, std::ostream& out, MpiRuntime* runtime) {
  const bool root = runtime == nullptr || runtime->world().rank() == 0;
  std::ostringstream discard;
  std::ostream& log = root ? out : discard;  // only rank 0 speaks
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    print_overview(log);
    return args.empty() ? 1 : 0;
  }
  if (args[0] == "--version") {
    log << "gradfix " << kVersion << (nccl_available() ? " (backends: mpi, nccl)" : " (backends: mpi)") << "\n";
    return 0;
  }
  JobContext context;
  if (runtime != nullptr) context.host = &runtime->world();
  // Every rank parses the same command line; agreeing on the outcome prints a bad flag once.
  // The job itself runs outside: its own steps agree where they can, and a failure in between
  // must reach main, which ends the other ranks.
  std::function<int()> job;
  agree_on_outcome(context, [&] { job = prepare_subcommand(args, log, runtime, context); });
  return job();
}

namespace {

std::function<int()> prepare_subcommand(const std::vector<std::string>& args, std::ostream& out, MpiRuntime* runtime,
                                        JobContext context) {
  const std::string subcommand = args[0];
  const Subcommand* known = nullptr;
  for (const auto& entry : kSubcommands)
    if (subcommand == entry.name) known = &entry;
  if (known == nullptr) {
    std::string names;
    for (const auto& entry : kSubcommands) names += (names.empty() ? "" : ", ") + std::string(entry.name);
    throw InputError("unknown subcommand '" + subcommand + "'; valid: " + names + " (gradfix --help)");
  }

  po::options_description options(std::string("usage: ") + known->usage + "\n\n" + known->summary, 110, 55);
  po::positional_options_description positional;
  options.add(general_options());
  po::options_description specific("Inputs");
  if (subcommand == "inspect") {
    specific.add_options()
        ("file", po::value<std::string>(), "checkpoint to list (positional)")
        ("other", po::value<std::string>(), "second checkpoint to compare with (positional)")
        ("include", po::value<std::vector<std::string>>()->composing(), "only tensors matching this regex (repeatable)")
        ("exclude", po::value<std::vector<std::string>>()->composing(), "leave out tensors matching this regex (repeatable)")
        ("json", po::value<std::string>(), "also write the report as JSON to this file");
    positional.add("file", 1).add("other", 1);
  } else if (subcommand == "convert") {
    specific.add_options()("in", po::value<std::string>(), "checkpoint to read (positional)");
    positional.add("in", 1).add("out", 1);
  } else if (subcommand == "generate") {
    specific.add_options()
        ("mlp", po::value<std::string>(), "layer widths of an MLP: layers.{i}.weight and layers.{i}.bias")
        ("shapes", po::value<std::string>(), "tensors as NAME=DIMxDIM,... (e.g. w=256x784,b=256)")
        ("dtype", po::value<std::string>()->default_value("F32"), "dtype for --mlp and --shapes")
        ("like", po::value<std::string>(), "take the tensors of this checkpoint, scaled by --like-scale")
        ("like-scale", po::value<double>()->default_value(1.0), "factor on the --like values")
        ("noise", po::value<double>()->default_value(1.0), "standard deviation of the added Gaussian noise")
        ("seed", po::value<unsigned long long>()->default_value(0), "random seed");
  } else if (subcommand == "init") {
    specific.add_options()
        ("arch", po::value<std::string>()->default_value("mlp"), "architecture: mlp")
        ("dims", po::value<std::string>(), "mlp layer widths, input first: 784,256,10")
        ("seed", po::value<unsigned long long>()->default_value(0), "initialisation seed")
        ("out", po::value<std::string>(), "weights file to write");
  } else if (subcommand == "train" || subcommand == "eval" || subcommand == "signs") {
    specific.add_options()
        ("model", po::value<std::string>()->default_value("builtin"), "builtin (architecture from the weights' metadata) or torchscript:ARCHIVE")
        ("device", po::value<std::string>()->default_value("cpu"), "cpu, cuda (the GPU of this rank on its node) or cuda:N")
        ("weights", po::value<std::string>(), "model weights (for torchscript: optional, replacing the archive's parameters by name)")
        ("data", po::value<std::string>(), "dataset: FILE.h5 (inputs, labels), an IDX '*-images-idx3-ubyte[.gz]' file, or DIR:SPLIT")
        ("transform", po::value<std::string>()->default_value("none"), "input shift applied to the data: none|invert|rotate90");
    if (subcommand == "train")
      specific.add_options()
          ("epochs", po::value<int>()->default_value(1), "passes over the data")
          ("lr", po::value<double>()->default_value(1e-3), "Adam learning rate")
          ("batch", po::value<long long>()->default_value(128), "batch size")
          ("skip", po::value<long long>()->default_value(0), "skip the first N samples")
          ("limit", po::value<long long>()->default_value(0), "use at most N samples (0: all)")
          ("seed", po::value<unsigned long long>()->default_value(0), "shuffling seed")
          ("out", po::value<std::string>(), "trained weights to write");
    if (subcommand == "signs")
      specific.add_options()
          ("shots-per-class", po::value<long long>()->default_value(5), "K labelled samples per class, drawn with --seed")
          ("indices", po::value<std::string>(), "use exactly these samples: a file of indices (instead of --shots-per-class)")
          ("num-batches", po::value<long long>()->default_value(0), "use the first N batches of a seeded shuffle (instead of --shots-per-class)")
          ("batch-size", po::value<long long>()->default_value(32), "batch size for --num-batches")
          ("seed", po::value<unsigned long long>()->default_value(0), "sampling seed")
          ("sign-mode", po::value<std::string>()->default_value("max"), "max: per-sample vote counts; mean: summed -gradients")
          ("method", po::value<std::string>()->default_value("fast"), "fast: one batched backward pass; loop: one backward per sample")
          ("out", po::value<std::string>(), "statistics file to write");
  } else if (subcommand == "transport") {
    specific.add_options()
        ("model", po::value<std::string>()->default_value("builtin"), "builtin or torchscript:ARCHIVE (B's architecture)")
        ("device", po::value<std::string>()->default_value("cpu"), "cpu, cuda (the GPU of this rank on its node) or cuda:N")
        ("target", po::value<std::string>(), "target model B (weights)")
        ("task-vector", po::value<std::string>(), "source task vector tau_A")
        ("source-base", po::value<std::string>(), "A_base, with --source-finetuned instead of --task-vector")
        ("source-finetuned", po::value<std::string>(), "A_ft")
        ("target-finetuned", po::value<std::string>(), "B fine-tuned: enables the oracle and the upper bound")
        ("data", po::value<std::string>(), "pool of labelled task samples: the shots and the support set")
        ("test-data", po::value<std::string>(), "test set, read only for the final evaluation")
        ("transform", po::value<std::string>()->default_value("none"), "input shift of the task: none|invert|rotate90")
        ("shots-per-class", po::value<long long>()->default_value(5), "K")
        ("indices", po::value<std::string>(), "the shots as a file of pool indices (instead of --shots-per-class)")
        ("num-batches", po::value<long long>()->default_value(0), "the shots as the first N batches of a seeded shuffle of the pool")
        ("batch-size", po::value<long long>()->default_value(32), "batch size for --num-batches")
        ("support-size", po::value<long long>()->default_value(1000), "support samples for choosing alpha (disjoint from the shots)")
        ("seed", po::value<unsigned long long>()->default_value(0), "sampling seed")
        ("sign-mode", po::value<std::string>()->default_value("max"), "max|mean")
        ("mask-mode", po::value<std::string>()->default_value("normal"), ("mask rule: " + mask_mode_names()).c_str())
        ("alphas", po::value<std::string>()->default_value("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"), "alpha grid, searched on the support set")
        ("no-few-shot-baseline", po::bool_switch(), "skip the few-shot fine-tuning baseline")
        ("out", po::value<std::string>(), "transported model (GradFix, best alpha) to write")
        ("results", po::value<std::string>(), "results.json to write");
  } else if (subcommand == "demo") {
    specific.add_options()
        ("quick", po::bool_switch(), "a tiny configuration (smoke test: a few thousand samples, one seed)")
        ("cache", po::value<std::string>()->default_value("out/demo"), "where trained models are cached")
        ("data-dir", po::value<std::string>()->default_value("/usr/share/datasets/fashion-mnist"), "Fashion-MNIST IDX files")
        ("transform", po::value<std::string>()->default_value("rotate90"), "the task's input shift: rotate90|invert")
        ("sign-mode", po::value<std::string>()->default_value("max"), "max|mean")
        ("independent-init", po::bool_switch(), "initialise A and B with different seeds (default: one shared initialisation)")
        ("alphas", po::value<std::string>()->default_value("0.2,0.4,0.6,0.8,1.0,1.2,1.4,1.6,1.8,2.0"),
         "alpha grid, searched on the support set (wider than transport's: the naive optimum lies past 1 here)")
        ("results", po::value<std::string>(), "results JSON to write");
  } else if (subcommand == "taskvector") {
    specific.add_options()
        ("base", po::value<std::string>(), "pre-trained checkpoint A_base")
        ("finetuned", po::value<std::string>(), "fine-tuned checkpoint A_ft");
  } else if (subcommand == "apply") {
    specific.add_options()
        ("base", po::value<std::string>(), "checkpoint to add the task vector to")
        ("task-vector", po::value<std::string>(), "task vector (may cover a subset of the base's tensors)")
        ("alpha", po::value<double>()->default_value(1.0), "scaling coefficient");
  } else if (subcommand == "mask") {
    specific.add_options()
        ("task-vector", po::value<std::string>(), "task vector to mask")
        ("signs", po::value<std::string>(), "statistics along the descent direction: signs, vote counts or summed -gradients (for oracle: the target's own task vector)");
  } else if (subcommand == "merge") {
    specific.add_options()
        ("task-vector", po::value<std::vector<std::string>>()->composing(), "task vector (repeat for each)")
        ("signs", po::value<std::vector<std::string>>()->composing(), "statistics of each task vector, in the same order (with --order)")
        ("method", po::value<std::string>()->default_value("mean"), "mean|sum|ties")
        ("ties-fraction", po::value<double>()->default_value(0.2), "TIES: fraction of largest magnitudes kept")
        ("ties-elect", po::value<std::string>()->default_value("count"), "TIES sign election: count|mass")
        ("ties-scope", po::value<std::string>()->default_value("tensor"), "TIES trim scope: tensor|global")
        ("order", po::value<std::string>()->default_value("none"), "none|mask-then-merge|merge-then-mask");
  }
  options.add(specific);
  const bool model_subcommand = subcommand == "init" || subcommand == "train" || subcommand == "eval" || subcommand == "signs" ||
                                subcommand == "transport" || subcommand == "demo";
  if (subcommand != "inspect" && !model_subcommand) options.add(output_options());
  if (subcommand == "mask" || subcommand == "merge") options.add(mask_options());

  po::variables_map values;
  try {
    const std::vector<std::string> rest(args.begin() + 1, args.end());
    po::store(po::command_line_parser(with_config(rest, subcommand, options)).options(options).positional(positional).run(),
              values);
    po::notify(values);
  } catch (const po::error& error) {
    throw InputError("gradfix " + subcommand + ": " + error.what() + " (gradfix " + subcommand + " --help)");
  }
  if (values.count("help")) {
    out << options << "\n";
    return [] { return 0; };
  }

  // The statistics communicator: the MPI world, or NCCL over it.
  std::shared_ptr<Communicator> stats;
  context.chunk_elements = values["chunk-elements"].as<long long>();
  if (context.chunk_elements < 1) throw InputError("--chunk-elements must be positive");
  const std::string backend = values["backend"].as<std::string>();
  if (backend != "auto" && backend != "mpi" && backend != "nccl") throw InputError("unknown --backend '" + backend + "'; valid: auto|mpi|nccl");
  const bool on_device = values.count("device") && values["device"].as<std::string>() != "cpu";
  if (values.count("device")) {
    // Checked before any communicator exists: a bad device is bad input, and a GPU asked for
    // where there is none is refused, never replaced by the CPU.
    const std::string device = values["device"].as<std::string>();
    if (device != "cpu" && device != "cuda" && device.rfind("cuda:", 0) != 0)
      throw InputError("unknown --device '" + device + "'; valid: cpu, cuda, cuda:N");
    if (on_device && cuda_device_count() == 0)
      throw InputError("--device " + device + ": no CUDA device is usable here (no GPU is visible, or this build has no CUDA); use --device cpu");
  }
  if (runtime != nullptr) {
    context.local_rank = runtime->local_rank();
    // File jobs keep tensors in host memory; model jobs on --device cuda make auto choose NCCL.
    stats = make_communicator(backend, *runtime, on_device);
    context.stats = stats.get();
    if (runtime->world().size() > 1 || backend != "auto")
      out << "gradfix: " << runtime->world().size() << " rank(s), statistics backend " << stats->backend()
          << (backend == "auto" ? (on_device ? " (auto: tensors are on CUDA devices)" : " (auto: tensors are in host memory)") : "") << "\n";
  } else if (backend == "nccl") {
    throw InputError("--backend nccl needs the MPI runtime that the gradfix program starts");
  }
  const bool report_memory = values["report-memory"].as<bool>();
  auto run = [stats, context, &out, report_memory](auto job_function, const auto& job) {
    return as_job([context, &out, job_function, job] { job_function(job, out, context); }, stats, context.host, out,
                  report_memory);
  };

  if (subcommand == "inspect") {
    InspectJob job;
    job.file = require(values, "file", subcommand);
    if (values.count("other")) job.other = values["other"].as<std::string>();
    job.include = strings(values, "include");
    job.exclude = strings(values, "exclude");
    if (values.count("json")) job.json_out = values["json"].as<std::string>();
    return run(run_inspect, job);
  }
  if (model_subcommand) return prepare_model_subcommand(subcommand, values, out, context, stats);
  const OutputOptions output = parse_output(values);
  if (subcommand == "generate") {
    GenerateJob job;
    const std::string dtype_text = values["dtype"].as<std::string>();
    const auto dtype = parse_dtype(dtype_text);
    if (!dtype) throw InputError("unknown --dtype '" + dtype_text + "'");
    if (values.count("mlp") + values.count("shapes") + values.count("like") != 1)
      throw InputError("gradfix generate: give exactly one of --mlp, --shapes and --like");
    if (values.count("mlp")) job.layout = mlp_layout(values["mlp"].as<std::string>(), *dtype);
    if (values.count("shapes")) job.layout = parse_shapes(values["shapes"].as<std::string>(), *dtype);
    if (values.count("like")) job.like = values["like"].as<std::string>();
    job.like_scale = values["like-scale"].as<double>();
    job.noise = values["noise"].as<double>();
    job.seed = values["seed"].as<unsigned long long>();
    job.out = require(values, "out", subcommand);
    job.output = output;
    return run(run_generate, job);
  }
  if (subcommand == "convert")
    return run(run_convert, ConvertJob{require(values, "in", subcommand), require(values, "out", subcommand), output});
  if (subcommand == "taskvector")
    return run(run_taskvector, TaskVectorJob{require(values, "base", subcommand), require(values, "finetuned", subcommand),
                                             require(values, "out", subcommand), output});
  if (subcommand == "apply")
    return run(run_apply, ApplyJob{require(values, "base", subcommand), require(values, "task-vector", subcommand),
                                   values["alpha"].as<double>(), require(values, "out", subcommand), output});
  if (subcommand == "mask") {
    MaskJob job;
    job.task_vector = require(values, "task-vector", subcommand);
    job.signs = require(values, "signs", subcommand);
    job.mode = parse_mask_mode(values["mask-mode"].as<std::string>());
    job.mask = parse_mask_options(values);
    job.out = require(values, "out", subcommand);
    job.output = output;
    return run(run_mask, job);
  }
  MergeJob job;
  job.task_vectors = strings(values, "task-vector");
  job.signs = strings(values, "signs");
  job.method = parse_merge_method(values["method"].as<std::string>());
  job.ties.fraction = values["ties-fraction"].as<double>();
  job.ties.elect = parse_ties_elect(values["ties-elect"].as<std::string>());
  job.ties.scope = parse_ties_scope(values["ties-scope"].as<std::string>());
  job.order = parse_merge_order(values["order"].as<std::string>());
  job.mode = parse_mask_mode(values["mask-mode"].as<std::string>());
  job.mask = parse_mask_options(values);
  job.out = require(values, "out", subcommand);
  job.output = output;
  return run(run_merge, job);
}

std::vector<double> parse_alphas(const std::string& text) {
  std::vector<double> alphas;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    try {
      alphas.push_back(std::stod(item));
    } catch (const std::exception&) {
      throw InputError("--alphas: '" + item + "' is not a number");
    }
    if (!std::isfinite(alphas.back())) throw InputError("--alphas: every alpha must be finite, got '" + item + "'");
  }
  if (alphas.empty()) throw InputError("--alphas is empty");
  return alphas;
}

std::function<int()> prepare_model_subcommand(const std::string& subcommand, const po::variables_map& values, std::ostream& out,
                                              const JobContext& context, std::shared_ptr<Communicator> stats) {
  const bool report_memory = values["report-memory"].as<bool>();
  auto wrap = [stats, report_memory, &out, context](std::function<void()> work) {
    return as_job(std::move(work), stats, context.host, out, report_memory);
  };
  auto data_of = [&](const char* key) { return DataOptions{require(values, key, subcommand), values["transform"].as<std::string>()}; };
  if (subcommand == "init") {
    InitJob job{values["arch"].as<std::string>(), require(values, "dims", subcommand), values["seed"].as<unsigned long long>(),
                require(values, "out", subcommand)};
    return wrap([job, &out] { run_init(job, out); });
  }
  const std::string model_spec = values.count("model") ? values["model"].as<std::string>() : "builtin";
  const bool torchscript = model_spec.rfind("torchscript:", 0) == 0;
  auto weights = [&](const char* key) {
    return torchscript && !values.count(key) ? std::string() : require(values, key, subcommand);
  };
  auto selection_of = [&] {
    ShotSelection selection;
    if (values.count("indices")) selection.indices_file = values["indices"].as<std::string>();
    selection.num_batches = values["num-batches"].as<long long>();
    selection.batch_size = values["batch-size"].as<long long>();
    if (!selection.indices_file.empty() && selection.num_batches > 0) throw InputError("give --indices or --num-batches, not both");
    return selection;
  };
  if (subcommand == "train") {
    TrainJob job;
    job.device = values["device"].as<std::string>();
    job.model = model_spec;
    job.weights = weights("weights");
    job.data = data_of("data");
    job.epochs = values["epochs"].as<int>();
    job.lr = values["lr"].as<double>();
    job.batch = values["batch"].as<long long>();
    job.skip = values["skip"].as<long long>();
    job.limit = values["limit"].as<long long>();
    job.seed = values["seed"].as<unsigned long long>();
    job.out = require(values, "out", subcommand);
    if (job.epochs < 1 || job.batch < 1 || !(job.lr > 0.0) || !std::isfinite(job.lr))
      throw InputError("gradfix train: --epochs and --batch must be positive and --lr a positive finite number");
    return wrap([job, &out, context] { run_train(job, out, context); });
  }
  if (subcommand == "eval") {
    EvalJob job{values["device"].as<std::string>(), model_spec, weights("weights"), data_of("data")};
    return wrap([job, &out] { run_eval(job, out); });
  }
  if (subcommand == "signs") {
    SignsJob job;
    job.device = values["device"].as<std::string>();
    job.model = model_spec;
    job.weights = weights("weights");
    job.data = data_of("data");
    job.shots_per_class = values["shots-per-class"].as<long long>();
    job.selection = selection_of();
    job.seed = values["seed"].as<unsigned long long>();
    job.sign_mode = values["sign-mode"].as<std::string>();
    job.method = values["method"].as<std::string>();
    job.out = require(values, "out", subcommand);
    if (job.sign_mode != "max" && job.sign_mode != "mean") throw InputError("unknown --sign-mode '" + job.sign_mode + "'; valid: max|mean");
    if (job.method != "fast" && job.method != "loop") throw InputError("unknown --method '" + job.method + "'; valid: fast|loop");
    return wrap([job, &out, context] { run_signs(job, out, context); });
  }
  if (subcommand == "transport") {
    TransportJob job;
    job.device = values["device"].as<std::string>();
    job.model = model_spec;
    job.target = weights("target");
    if (values.count("task-vector")) job.task_vector = values["task-vector"].as<std::string>();
    if (values.count("source-base")) job.source_base = values["source-base"].as<std::string>();
    if (values.count("source-finetuned")) job.source_finetuned = values["source-finetuned"].as<std::string>();
    if (values.count("target-finetuned")) job.target_finetuned = values["target-finetuned"].as<std::string>();
    job.data = data_of("data");
    job.test = data_of("test-data");
    job.shots_per_class = values["shots-per-class"].as<long long>();
    job.selection = selection_of();
    job.support_size = values["support-size"].as<long long>();
    job.seed = values["seed"].as<unsigned long long>();
    job.sign_mode = values["sign-mode"].as<std::string>();
    job.mask_mode = parse_mask_mode(values["mask-mode"].as<std::string>());
    job.alphas = parse_alphas(values["alphas"].as<std::string>());
    job.few_shot_baseline = !values["no-few-shot-baseline"].as<bool>();
    if (values.count("out")) job.out = values["out"].as<std::string>();
    if (values.count("results")) job.results = values["results"].as<std::string>();
    if (job.sign_mode != "max" && job.sign_mode != "mean") throw InputError("unknown --sign-mode '" + job.sign_mode + "'; valid: max|mean");
    return wrap([job, &out, context] { run_transport(job, out, context); });
  }
  DemoJob job;
  job.cache = values["cache"].as<std::string>();
  job.data_dir = values["data-dir"].as<std::string>();
  job.transform = values["transform"].as<std::string>();
  job.sign_mode = values["sign-mode"].as<std::string>();
  job.independent_init = values["independent-init"].as<bool>();
  job.alphas = parse_alphas(values["alphas"].as<std::string>());
  if (job.sign_mode != "max" && job.sign_mode != "mean") throw InputError("unknown --sign-mode '" + job.sign_mode + "'; valid: max|mean");
  if (values.count("results")) job.results = values["results"].as<std::string>();
  if (values["quick"].as<bool>()) {
    job.shots = {2};
    job.seeds = {0};
    job.dims = "784,32,10";
    job.pretrain_epochs = 1;
    job.finetune_epochs = 1;
    job.pretrain_limit = 3000;
    job.finetune_limit = 2000;
    job.test_limit = 1000;
    job.support_size = 300;
  }
  return wrap([job, &out, context] { run_demo(job, out, context); });
}

}  // namespace

}  // namespace gradfix
