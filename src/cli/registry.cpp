// The table of subcommands, filled by the registrations in src/cli/commands/, and the option
// groups they share.
#include "gradfix/cli/registry.hpp"

#include <algorithm>
#include <utility>

#include "commands/common.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

using T = OptionType;

// The table, kept in overview order as registrations arrive. A function's static: registrations
// run during static initialisation, in no order across files.
std::vector<SubcommandSpec>& table() {
  static std::vector<SubcommandSpec> entries;
  return entries;
}

}  // namespace

SubcommandRegistration::SubcommandRegistration(HelpSection section, SubcommandSpec spec) {
  spec.section = section;
  auto& entries = table();
  const auto place = std::find_if(entries.begin(), entries.end(), [&](const SubcommandSpec& entry) {
    return std::make_pair(entry.section, entry.name) > std::make_pair(spec.section, spec.name);
  });
  entries.insert(place, std::move(spec));
}

const char* section_title(HelpSection section) {
  switch (section) {
    case HelpSection::kCheckpoints: return "checkpoints and task vectors";
    case HelpSection::kModels: return "models (gradfix-torch)";
    case HelpSection::kRuns: return "runs of many jobs";
  }
  return "?";
}

const std::vector<OptionSpec>& group_options(OptionGroup group) {
  static const std::vector<OptionSpec> kGeneral = {
      {"help", T::kFlag, "", "show this help"},
      {"config", T::kText, "", "INI file of options (top-level keys and a [SUBCOMMAND] section); flags win"},
      {"backend", T::kText, "auto", "communicator for statistics: auto|mpi|nccl (auto: nccl when tensors are on CUDA devices, else mpi)"},
      {"chunk-elements", T::kInteger, "4194304", "elements per processing buffer (bounds memory per rank)"},
      {"prefetch", T::kText, "on",
       "model jobs on several ranks: gather the next stage's weights on a helper thread while this one computes (on|off; one "
       "stage ahead, so a rank holds two at most)"},
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
      commands::strict_config_option()};
  switch (group) {
    case OptionGroup::kGeneral: return kGeneral;
    case OptionGroup::kOutput: return kOutput;
    case OptionGroup::kMask: return kMask;
    case OptionGroup::kModel: return kModel;
  }
  GRADFIX_CHECK(false, "unknown option group");
}

const std::vector<SubcommandSpec>& subcommands() { return table(); }

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
