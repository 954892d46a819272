#pragma once
// The command line: `gradfix SUBCOMMAND [options]`, parsed with Boost.Program_options. Every
// option can also come from an INI file given with --config: top-level `key = value` lines and
// lines under a [SUBCOMMAND] section apply; a flag on the command line wins over the file.

#include <ostream>
#include <string>
#include <vector>

#include "gradfix/cli/registry.hpp"

namespace gradfix {

class MpiRuntime;

// Runs one command line (without the program name) on this rank. Throws gradfix::Error on
// failure; returns the exit code otherwise (0, or 1 when no subcommand was given). Without a
// runtime it runs as a single process that never calls MPI.
int run_command_line(const std::vector<std::string>& args, std::ostream& out, MpiRuntime* runtime = nullptr);

// Boost.Program_options formats its error messages by substituting placeholders (%value%,
// %invalid_line%, ...) until none is left, so text holding one loops forever (found by fuzzing).
// Text with a %word% in it is refused before Boost sees it: InputError naming `where`.
void refuse_boost_placeholders(const std::string& text, const std::string& where);
// An INI file's text (at most 16 MiB), checked for placeholders; `what` names it in errors.
std::string read_option_file(const std::string& path, const std::string& what);

// Parses one subcommand's command line ("transport", options...) into its job, as the command
// line would, without making a job context: what `gradfix sweep` runs for each point.
PreparedJob prepare_subcommand(const std::vector<std::string>& args);

// The number `text` of option --`name`, all of it (no trailing characters); InputError otherwise.
double parse_number(const std::string& name, const std::string& text);

// "5GB" (10^9), "512MiB" or "512M" (2^20), "1000000": bytes. Throws InputError on anything else.
long long parse_byte_size(const std::string& text, const std::string& option);

}  // namespace gradfix
