#pragma once
// The one table of subcommands. Each subcommand declares itself once, in its own file under
// src/cli/commands/ (a SubcommandRegistration at namespace scope): its name, usage line and
// summary, the executable that runs it, its options (type, default, help, position), and the
// function that turns parsed options into a typed job, checked by the job's validate(). The
// overview, `--help`, parsing, config files, the hand-over from `gradfix` to `gradfix-torch`, and
// the test that docs/cli.md documents every option all read this table.

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "gradfix/dist/job_context.hpp"

namespace gradfix {

enum class OptionType {
  kText,     // one string
  kTexts,    // a repeatable string: --task-vector A --task-vector B
  kInteger,  // a signed 64-bit integer
  kCount,    // an unsigned 64-bit integer (seeds)
  kNumber,   // a double
  kFlag,     // present or not
};

struct OptionSpec {
  std::string name;           // without the leading dashes
  OptionType type = OptionType::kText;
  std::string default_value;  // text form; empty: no default
  std::string help;
};

// Options that several subcommands share, declared once each.
enum class OptionGroup {
  kGeneral,  // --help, --config, --backend, --chunk-elements, --report-memory: every subcommand
  kOutput,   // --out, --out-dtype, --include, --exclude, --allow-nonfinite, --max-shard-size
  kMask,     // --mask-mode and the soft modes' parameters
  kModel,    // --model, --device: the subcommands that load a model
};

enum class Executable { kGradfix, kTorch };

// Where the overview lists a subcommand (by name within its section).
enum class HelpSection { kCheckpoints, kModels, kRuns };

// Typed access to the parsed options of one subcommand; the messages name the option.
class Options {
 public:
  virtual ~Options() = default;
  virtual bool has(const std::string& name) const = 0;  // given, or has a default
  virtual const std::string& text(const std::string& name) const = 0;
  virtual std::vector<std::string> texts(const std::string& name) const = 0;  // empty when absent
  virtual long long integer(const std::string& name) const = 0;
  virtual unsigned long long count(const std::string& name) const = 0;
  virtual double number(const std::string& name) const = 0;
  virtual bool flag(const std::string& name) const = 0;
  // text(name), or InputError "gradfix SUBCOMMAND: --NAME is required".
  virtual const std::string& required(const std::string& name) const = 0;
};

// A job ready to run: its options parsed and checked.
using PreparedJob = std::function<void(std::ostream& log, const JobContext& context)>;

struct SubcommandSpec {
  std::string name;
  std::string usage;    // "gradfix apply --base B --task-vector T --alpha A --out OUT"
  std::string summary;  // one line, for the overview
  Executable executable = Executable::kGradfix;
  std::vector<OptionGroup> groups;  // besides kGeneral, which every subcommand has
  std::vector<OptionSpec> options;
  std::vector<std::string> positional;  // options also accepted as positional arguments, in order
  // Parses the options into the subcommand's job and checks them; throws InputError.
  std::function<PreparedJob(const Options&)> prepare;
  // --config names the subcommand's own input (a sweep file), not a file of its options.
  bool config_is_input = false;
  HelpSection section = HelpSection::kCheckpoints;
};

// Adds a subcommand to the table during static initialisation. gradfix_cli is an object library,
// so every registration is linked into each program that links it.
struct SubcommandRegistration {
  SubcommandRegistration(HelpSection section, SubcommandSpec spec);
};

// Every subcommand, by section and then by name.
const std::vector<SubcommandSpec>& subcommands();
const char* section_title(HelpSection section);
// nullptr for an unknown name.
const SubcommandSpec* find_subcommand(const std::string& name);
// The options of a group, as declared.
const std::vector<OptionSpec>& group_options(OptionGroup group);
// Every option of a subcommand: general first, then its groups, then its own.
std::vector<OptionSpec> all_options(const SubcommandSpec& subcommand);

}  // namespace gradfix
