// The command line over the subcommand registry: help, parsing (Boost.Program_options, for flags
// and for INI config files), the job context (ranks, communicators, device), and the run.
#include "gradfix/cli/cli.hpp"
#include "gradfix/cli/mergekit.hpp"

#include <boost/program_options.hpp>
#include <cctype>
#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include "gradfix/cli/registry.hpp"
#include "gradfix/dist/backend.hpp"
#include "gradfix/dist/mpi.hpp"
#include "gradfix/dist/timing.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/model_files.hpp"
#include "gradfix/model/jobs.hpp"
#include "gradfix/io/hdf5_store.hpp"
#include "gradfix/version.hpp"

namespace gradfix {
namespace po = boost::program_options;

namespace {

std::string trim(const std::string& text) {
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";
  const auto last = text.find_last_not_of(" \t\r\n");
  return text.substr(first, last - first + 1);
}

// The Boost semantic of one declared option. Numbers are taken as text and converted here:
// Boost's own conversion errors format their message by substituting the value for "%value%"
// until none is left, which never ends when the value itself holds "%value%" (found by the
// config fuzz harness: `--timeout %value%` hung).
po::value_semantic* semantic_of(const OptionSpec& option) {
  const bool has_default = !option.default_value.empty();
  switch (option.type) {
    case OptionType::kText:
    case OptionType::kInteger:
    case OptionType::kCount:
    case OptionType::kNumber: {
      auto* value = po::value<std::string>();
      return has_default ? value->default_value(option.default_value) : value;
    }
    case OptionType::kTexts: return po::value<std::vector<std::string>>()->composing();
    case OptionType::kFlag: return option.name == "help" ? static_cast<po::value_semantic*>(new po::untyped_value(true)) : po::bool_switch();
  }
  GRADFIX_CHECK(false, "unknown option type of --" + option.name);
}

// Strict conversions of an option's text: the whole text must be the number.
long long to_integer(const std::string& name, const std::string& text) {
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) throw InputError("--" + name + ": '" + escaped_name(text) + "' is not a whole number");
  return value;
}
unsigned long long to_count(const std::string& name, const std::string& text) {
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos)
    throw InputError("--" + name + ": '" + escaped_name(text) + "' is not a non-negative whole number");
  try {
    return std::stoull(text);
  } catch (const std::exception&) {
    throw InputError("--" + name + ": '" + escaped_name(text) + "' is too large");
  }
}

// Options that name a model or checkpoint to read: each may also be a Hugging Face hub name
// (ORG/NAME[@REV]) found in the local cache when no such path exists.
const std::set<std::string> kModelInputOptions = {"weights", "target", "target-finetuned", "source-base", "source-finetuned", "task-vector",
                                                  "base", "finetuned", "file", "other", "in", "like"};

// The parsed values of one subcommand, typed.
class ParsedOptions final : public Options {
 public:
  ParsedOptions(const po::variables_map& values, std::string subcommand) : values_(values), subcommand_(std::move(subcommand)) {}

  bool has(const std::string& name) const override { return values_.count(name) > 0; }
  const std::string& text(const std::string& name) const override {
    const std::string& given = get<std::string>(name);
    if (!kModelInputOptions.count(name)) return given;
    const auto found = resolved_.find(name);
    if (found != resolved_.end()) return found->second;
    return resolved_.emplace(name, resolve_model_reference(given)).first->second;
  }
  std::vector<std::string> texts(const std::string& name) const override {
    std::vector<std::string> values = has(name) ? get<std::vector<std::string>>(name) : std::vector<std::string>{};
    if (kModelInputOptions.count(name))
      for (auto& value : values) value = resolve_model_reference(value);
    return values;
  }
  long long integer(const std::string& name) const override { return to_integer(name, get<std::string>(name)); }
  unsigned long long count(const std::string& name) const override { return to_count(name, get<std::string>(name)); }
  double number(const std::string& name) const override { return parse_number(name, get<std::string>(name)); }
  bool flag(const std::string& name) const override { return has(name) && get<bool>(name); }
  const std::string& required(const std::string& name) const override {
    if (!has(name)) throw InputError("gradfix " + subcommand_ + ": --" + name + " is required");
    return text(name);
  }

 private:
  template <typename Value>
  const Value& get(const std::string& name) const {
    GRADFIX_CHECK(has(name), "option --" + name + " of '" + subcommand_ + "' read but not declared with a default");
    try {
      return values_[name].as<Value>();
    } catch (const boost::bad_any_cast&) {
      GRADFIX_CHECK(false, "option --" + name + " of '" + subcommand_ + "' read as another type than declared");
    }
  }

  const po::variables_map& values_;
  std::string subcommand_;
  mutable std::map<std::string, std::string> resolved_;  // model inputs as resolved, once each
};

po::options_description describe(const std::string& title, const std::vector<OptionSpec>& options) {
  po::options_description description(title, 110, 55);
  for (const auto& option : options) {
    const std::string name = option.name == "help" ? "help,h" : option.name;
    description.add_options()(name.c_str(), semantic_of(option), option.help.c_str());
  }
  return description;
}

po::options_description describe_subcommand(const SubcommandSpec& subcommand) {
  po::options_description options("usage: " + subcommand.usage + "\n\n" + subcommand.summary, 110, 55);
  options.add(describe("General", group_options(OptionGroup::kGeneral)));
  static const std::map<OptionGroup, const char*> kTitles = {
      {OptionGroup::kOutput, "Output"}, {OptionGroup::kMask, "Masking"}, {OptionGroup::kModel, "Model"}};
  for (OptionGroup group : subcommand.groups) options.add(describe(kTitles.at(group), group_options(group)));
  if (!subcommand.options.empty()) options.add(describe("Inputs", subcommand.options));
  return options;
}

// Finds --config on the command line, without parsing anything else yet.
std::string config_path(const std::vector<std::string>& args) {
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--config" && i + 1 < args.size()) return args[i + 1];
    if (args[i].rfind("--config=", 0) == 0) return args[i].substr(9);
  }
  return "";
}

// An INI file through Boost's config-file parser: top-level keys apply to every subcommand,
// keys of the [SUBCOMMAND] section (which Boost reads as "SUBCOMMAND.key") to this one, sections
// of other subcommands are skipped, anything else is an error. Options already set on the
// command line keep their value: flags win, and a repeated option given there replaces the
// file's whole list.
void store_config_file(const std::string& path, const SubcommandSpec& subcommand, const po::options_description& options,
                       po::variables_map& values) {
  std::istringstream file(read_option_file(path, "config file"));
  po::parsed_options parsed(&options);
  try {
    parsed = po::parse_config_file(file, options, true);
  } catch (const po::error& error) {
    throw InputError(path + ": " + escaped_name(error.what()));
  }
  po::parsed_options mine(&options);
  for (auto entry : parsed.options) {
    std::string key = entry.string_key;
    const auto dot = key.find('.');
    if (dot != std::string::npos) {
      const std::string section = key.substr(0, dot);
      if (section != subcommand.name) {
        if (find_subcommand(section) != nullptr) continue;
        throw InputError(path + ": section [" + section + "] is not a subcommand of gradfix");
      }
      key = key.substr(dot + 1);
    }
    if (options.find_nothrow(key, false) == nullptr)
      throw InputError(path + ": option '" + key + "' is not an option of 'gradfix " + subcommand.name + "'");
    if (key == "config" || key == "help") continue;
    if (values.count(key) && !values[key].defaulted()) continue;
    entry.string_key = key;
    entry.unregistered = false;
    mine.options.push_back(entry);
  }
  try {
    po::store(mine, values);
  } catch (const po::error& error) {
    throw InputError(path + ": " + escaped_name(error.what()));
  }
}

// Peak resident memory (VmHWM) of this process, in KiB.
long long peak_resident_kib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6));
  return -1;
}

void print_peak_memory(Communicator& host, std::ostream& out) {
  const long long mine = peak_resident_kib();
  std::vector<long long> all(static_cast<std::size_t>(host.size()), mine);
  host.allgather(&mine, all.data(), 1, DType::kI64);
  out << "peak resident memory per rank (MiB):";
  for (long long kib : all) out << " " << kib / 1024;
  out << "\n";
}

void print_overview(std::ostream& out) {
  out << "gradfix " << GRADFIX_VERSION_STRING << ": transport and merge task vectors with gradient-sign masks\n\n"
      << "usage: gradfix SUBCOMMAND [options]   (gradfix SUBCOMMAND --help for its options)\n\n";
  const SubcommandSpec* previous = nullptr;
  for (const auto& subcommand : subcommands()) {
    if (previous == nullptr || previous->section != subcommand.section)
      out << (previous == nullptr ? "" : "\n") << section_title(subcommand.section) << ":\n";
    previous = &subcommand;
    std::string name = subcommand.name;
    name.resize(12, ' ');
    out << "  " << name << subcommand.summary << "\n";
  }
  out << "\nExit codes: 0 success, 2 bad input, 3 runtime failure. gradfix --version shows the build. Docs: docs/cli.md\n";
}

// What a user checks before submitting a job: the version, and what this build can do.
void print_version(std::ostream& out) {
  const std::string commit = GRADFIX_GIT_COMMIT;
  out << "gradfix " << GRADFIX_VERSION_STRING << (commit.empty() ? "" : " (commit " + commit + ")") << "\n";
  out << "  mpi       " << mpi_library_version() << "\n";
  const std::string nccl = nccl_version();
  out << "  nccl      " << (nccl.empty() ? "no (built without CUDA and NCCL)" : "yes, " + nccl) << "\n";
  const std::string cuda = cuda_runtime_version();
  out << "  cuda      "
      << (cuda.empty() ? "no" : "yes, runtime " + cuda + ", " + std::to_string(cuda_device_count()) + " device(s) visible") << "\n";
  const std::string torch = GRADFIX_TORCH_VERSION;
  out << "  libtorch  " << (torch.empty() ? "no (model subcommands unavailable)" : "yes, " + torch + " (gradfix-torch)") << "\n";
  out << "  hdf5      " << hdf5_version() << (hdf5_is_parallel() ? ", parallel (MPI-IO)" : ", serial") << "\n";
  out << "  backends  " << (nccl_available() ? "mpi, nccl" : "mpi") << "\n";
}

// Everything about the job that depends on flags: the subcommand's prepared job, the context,
// and the communicator that the context points at (held as long as the job).
struct CommandJob {
  PreparedJob job;
  std::shared_ptr<Communicator> stats;
  // The helper thread's twins of the world and of stats (--prefetch), made once every rank has
  // prepared the job.
  bool gathers_ahead = false;
  std::unique_ptr<Communicator> ahead_host;
  std::unique_ptr<Communicator> ahead_stats;
  JobContext context;
  bool report_memory = false;
  bool report_time = false;
  bool help_only = false;
};

// A subcommand's options from its command line (positional ones included) and its --config file
// (unless --config is the subcommand's own input), checked; a bad flag or value names the
// subcommand and points at its --help.
po::variables_map parse_values(const SubcommandSpec& subcommand, const po::options_description& options, const std::vector<std::string>& rest) {
  po::positional_options_description positional;
  for (const auto& option : subcommand.positional) positional.add(option.c_str(), 1);
  po::variables_map values;
  try {
    for (const auto& arg : rest) refuse_boost_placeholders(arg, "gradfix " + subcommand.name + ": argument");
    po::store(po::command_line_parser(rest).options(options).positional(positional).run(), values);
    const std::string config = config_path(rest);
    // A YAML file is a mergekit merge configuration, the merge subcommand's own input.
    const bool yaml = is_yaml_path(config);
    if (yaml && subcommand.name != "merge")
      throw InputError("gradfix " + subcommand.name + ": --config " + config +
                       " is YAML, a mergekit merge configuration, which only gradfix merge reads (option files are INI)");
    if (!config.empty() && !subcommand.config_is_input && !yaml) store_config_file(config, subcommand, options, values);
    po::notify(values);
  } catch (const po::error& error) {
    throw InputError("gradfix " + subcommand.name + ": " + error.what() + " (gradfix " + subcommand.name + " --help)");
  }
  return values;
}

CommandJob prepare(const std::vector<std::string>& args, std::ostream& out, MpiRuntime* runtime) {
  const std::string name = args[0];
  const SubcommandSpec* subcommand = find_subcommand(name);
  if (subcommand == nullptr) {
    std::string names;
    for (const auto& entry : subcommands()) names += (names.empty() ? "" : ", ") + entry.name;
    throw InputError("unknown subcommand '" + name + "'; valid: " + names + " (gradfix --help)");
  }
  const po::options_description options = describe_subcommand(*subcommand);
  const po::variables_map values = parse_values(*subcommand, options, std::vector<std::string>(args.begin() + 1, args.end()));
  CommandJob command;
  if (values.count("help")) {
    out << options << "\n";
    command.help_only = true;
    return command;
  }
  const ParsedOptions parsed(values, name);
  command.job = subcommand->prepare(parsed);
  command.report_memory = parsed.flag("report-memory");
  command.report_time = parsed.flag("report-time");

  const double timeout = parsed.number("timeout");
  if (!(timeout >= 0.0) || !std::isfinite(timeout)) throw InputError("--timeout must be 0 (no limit) or a positive number of seconds");
  MpiCommunicator::set_collective_timeout(timeout);
  const long long chunk_elements = parsed.integer("chunk-elements");
  if (chunk_elements < 1) throw InputError("--chunk-elements must be positive");
  const std::string prefetch = parsed.text("prefetch");
  if (prefetch != "on" && prefetch != "off") throw InputError("unknown --prefetch '" + prefetch + "'; valid: on|off");
  const std::string backend = parsed.text("backend");
  if (backend != "auto" && backend != "mpi" && backend != "nccl") throw InputError("unknown --backend '" + backend + "'; valid: auto|mpi|nccl");
  const std::string device = parsed.has("device") ? parsed.text("device") : "cpu";
  const bool on_device = device != "cpu";
  // Checked before any communicator exists: a bad device is bad input, and a GPU asked for where
  // there is none is refused, never replaced by the CPU.
  if (device != "cpu" && device != "cuda" && device.rfind("cuda:", 0) != 0)
    throw InputError("unknown --device '" + device + "'; valid: cpu, cuda, cuda:N");
  if (on_device && cuda_device_count() == 0)
    throw InputError("--device " + device + ": no CUDA device is usable here (no GPU is visible, or this build has no CUDA); use --device cpu");

  if (runtime != nullptr) {
    // File jobs keep tensors in host memory; model jobs on --device cuda make auto choose NCCL.
    command.stats = make_communicator(backend, *runtime, on_device);
    command.context = JobContext(runtime->world(), *command.stats);
    command.context.local_rank = runtime->local_rank();
    if (runtime->world().size() > 1 || backend != "auto") {
      out << "gradfix: " << runtime->world().size() << " rank(s), statistics backend " << command.stats->backend()
          << (backend == "auto" ? (on_device ? " (auto: tensors are on CUDA devices)" : " (auto: tensors are in host memory)") : "") << "\n";
      // Where each rank runs: what a user checks first when a job spans nodes.
      MpiCommunicator& world = runtime->world();
      out << "gradfix: " << describe_placement(world, world.rank_hosts(), runtime->local_rank(), configured_threads()) << "\n";
    }
    if (runtime->world().size() > 1 && subcommand->executable == Executable::kTorch && prefetch == "on") {
      command.gathers_ahead = runtime->thread_multiple();
      if (!command.gathers_ahead)
        out << "gradfix: --prefetch on, but this MPI has no MPI_THREAD_MULTIPLE: every gather waits for its stage (" << mpi_library_version()
            << ")\n";
    }
  } else if (backend == "nccl") {
    throw InputError("--backend nccl needs the MPI runtime that the gradfix program starts");
  }
  command.context.chunk_elements = chunk_elements;
  command.context.progress = !parsed.flag("quiet");
  command.context.strict_config = parsed.flag("strict-config");
  command.context.device = device;
  return command;
}

}  // namespace

double parse_number(const std::string& name, const std::string& text) {
  std::size_t used = 0;
  double value = 0.0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) throw InputError("--" + name + ": '" + escaped_name(text) + "' is not a number");
  return value;
}

void refuse_boost_placeholders(const std::string& text, const std::string& where) {
  for (std::size_t open = text.find('%'); open != std::string::npos; open = text.find('%', open + 1)) {
    std::size_t end = open + 1;
    while (end < text.size() && (std::isalpha(static_cast<unsigned char>(text[end])) || text[end] == '_')) ++end;
    if (end > open + 1 && end < text.size() && text[end] == '%')
      throw InputError(where + " holds '" + escaped_name(text.substr(open, end - open + 1)) +
                       "': a %word% cannot appear in options (the option parser would read it as its own placeholder)");
  }
}

std::string read_option_file(const std::string& path, const std::string& what) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw InputError(path + ": cannot open " + what);
  constexpr std::size_t kMaxBytes = 16u << 20;
  std::string text;
  char block[65536];
  while (file.read(block, sizeof block) || file.gcount() > 0) {
    text.append(block, static_cast<std::size_t>(file.gcount()));
    if (text.size() > kMaxBytes) throw InputError(path + ": " + what + " larger than 16 MiB");
  }
  std::size_t line = 1, begin = 0;
  while (begin <= text.size()) {
    const std::size_t end = std::min(text.find('\n', begin), text.size());
    refuse_boost_placeholders(text.substr(begin, end - begin), path + ": line " + std::to_string(line));
    begin = end + 1;
    ++line;
  }
  return text;
}

PreparedJob prepare_subcommand(const std::vector<std::string>& args) {
  GRADFIX_CHECK(!args.empty(), "an empty command line");
  const SubcommandSpec* subcommand = find_subcommand(args[0]);
  if (subcommand == nullptr) throw InputError("unknown subcommand '" + args[0] + "'");
  const po::options_description options = describe_subcommand(*subcommand);
  const po::variables_map values = parse_values(*subcommand, options, std::vector<std::string>(args.begin() + 1, args.end()));
  const ParsedOptions parsed(values, args[0]);
  return subcommand->prepare(parsed);
}

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
  if (found == kUnits.end() || !(number > 0.0) || !std::isfinite(number) || number * found->second > 9.0e18)
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
    print_version(log);
    return 0;
  }
  // Every rank parses the same command line; agreeing on the outcome prints a bad flag once.
  // The job itself runs outside: its own steps agree where they can, and a failure in between
  // must reach main, which ends the other ranks.
  CommandJob command;
  const JobContext world = runtime != nullptr ? JobContext(runtime->world(), runtime->world()) : JobContext();
  world.agree([&] { command = prepare(args, log, runtime); });
  if (command.help_only) return 0;
  if (command.gathers_ahead) {
    // Made here, not in prepare: every rank has prepared the job, so every rank is here to make them.
    command.ahead_host = runtime->world().duplicate();
    if (command.stats.get() != &runtime->world()) command.ahead_stats = command.stats->split(0, command.stats->rank());
    command.context.set_ahead(command.ahead_host.get(), command.ahead_stats.get());
  }
  const auto start = std::chrono::steady_clock::now();
  command.job(log, command.context);
  if (command.report_memory) print_peak_memory(command.context.host(), log);
  if (command.report_time) {
    print_step_times(command.context.host(), start, log);
    if (torch_available()) log << blas_description() << "\n";
  }
  return 0;
}

}  // namespace gradfix
