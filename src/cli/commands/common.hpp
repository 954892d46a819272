#pragma once
// What the subcommand files share: the parsing of option groups and of list-valued options, the
// options several model subcommands declare alike, and job_of, which checks a typed job and
// wraps it for the registry. Each subcommand file (NAME.cpp beside this one) registers one
// subcommand with a SubcommandRegistration.

#include <string>
#include <vector>

#include "gradfix/cli/registry.hpp"
#include "gradfix/jobs/jobs.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {
namespace commands {

using T = OptionType;

// The output group (--out-dtype, --include, ...) and the mask group (--beta, --soft-input, ...).
OutputOptions parse_output(const Options& values);
MaskOptions parse_mask_options(const Options& values);
// A comma-separated list of finite numbers given as --`key` ("0.5, 1, 2").
std::vector<double> parse_numbers(const std::string& text, const std::string& key);

// The model subcommands' data options (--weights, --data, --transform), their shot selection, and
// --strict-config (also init's). Functions, not globals: the registrations that copy them run
// during static initialisation, in no order across files.
const std::vector<OptionSpec>& data_options();
const std::vector<OptionSpec>& shot_options();
const OptionSpec& strict_config_option();
// A TorchScript archive may carry its own parameters: then the weights are optional.
std::string weights_of(const Options& values, const std::string& key);
DataOptions data_of(const Options& values, const std::string& key);
ShotSelection selection_of(const Options& values);

std::vector<OptionSpec> joined(std::vector<OptionSpec> first, const std::vector<OptionSpec>& second);

// Checks the job (its validate(), beside the job's code) and wraps it with its run function.
template <typename Job, typename Run>
PreparedJob job_of(Job job, Run run) {
  job.validate();
  return [job, run](std::ostream& log, const JobContext& context) { run(job, log, context); };
}

}  // namespace commands
}  // namespace gradfix
