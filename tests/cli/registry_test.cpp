// The subcommand registry against the user documentation: docs/cli.md must document every
// subcommand and every option the registry declares, each where a user looks for it.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "gradfix/cli/registry.hpp"
#include "gradfix/cli/sweep.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

// docs/cli.md split at its headings: heading text -> the text up to the next heading.
std::map<std::string, std::string> sections_of_cli_doc() {
  std::ifstream file(std::string(GRADFIX_SOURCE_DIR) + "/docs/cli.md");
  EXPECT_TRUE(file.good()) << "cannot open docs/cli.md";
  std::map<std::string, std::string> sections;
  std::string line, heading;
  while (std::getline(file, line)) {
    if (line.rfind("#", 0) == 0) {
      heading = line.substr(line.find(' ') + 1);
      continue;
    }
    sections[heading] += line + "\n";
  }
  return sections;
}

// The section whose heading starts with "`gradfix NAME" (a subcommand's own section).
const std::string* section_of(const std::map<std::string, std::string>& sections, const std::string& prefix) {
  for (const auto& [heading, text] : sections)
    if (heading.rfind(prefix, 0) == 0) return &text;
  return nullptr;
}

bool documents(const std::string& text, const std::string& option) {
  const std::string flag = "--" + option;
  for (auto found = text.find(flag); found != std::string::npos; found = text.find(flag, found + 1)) {
    const std::size_t end = found + flag.size();
    // "--seed" must not be satisfied by "--seeds" or "--seed-x".
    if (end == text.size() || !(std::isalnum(static_cast<unsigned char>(text[end])) || text[end] == '-')) return true;
  }
  return false;
}

TEST(Registry, NamesAndOptionsAreUnique) {
  std::set<std::string> names;
  for (const auto& subcommand : subcommands()) {
    EXPECT_TRUE(names.insert(subcommand.name).second) << subcommand.name;
    std::set<std::string> options;
    for (const auto& option : all_options(subcommand))
      EXPECT_TRUE(options.insert(option.name).second) << subcommand.name << " declares --" << option.name << " twice";
    for (const auto& positional : subcommand.positional) EXPECT_TRUE(options.count(positional)) << subcommand.name << ": " << positional;
    EXPECT_NE(find_subcommand(subcommand.name), nullptr);
  }
  EXPECT_EQ(find_subcommand("frobnicate"), nullptr);
}

// Every file under src/cli/commands/ registered its subcommand (the object library keeps
// registrations nothing calls), and the table is in overview order: by section, then by name.
TEST(Registry, EverySubcommandFileRegisteredInOverviewOrder) {
  std::vector<std::string> names;
  for (const auto& subcommand : subcommands()) names.push_back(subcommand.name);
  const std::vector<std::string> expected = {"apply", "convert", "generate", "inspect", "mask", "merge", "taskvector", "eval",
                                             "init",  "signs",   "train",    "transport", "demo", "sweep"};
  EXPECT_EQ(names, expected);
  EXPECT_EQ(find_subcommand("transport")->section, HelpSection::kModels);
  EXPECT_EQ(find_subcommand("transport")->executable, Executable::kTorch);
}

// Flags that go together only one at a time reach SweepJob::validate() from the command line.
TEST(Registry, SweepOptionsAreValidated) {
  SweepJob sweep;
  auto message = [&] {
    try {
      sweep.validate();
    } catch (const InputError& error) {
      return std::string(error.what());
    }
    return std::string();
  };
  EXPECT_EQ(message(), "gradfix sweep: --config SWEEP.ini is required");
  sweep.config = "sweep.ini";
  EXPECT_EQ(message(), "");
  sweep.list = true;
  sweep.point = 3;
  EXPECT_EQ(message(), "give one of --point, --list, --count and --collect");
}

TEST(Registry, DocsCliDocumentsEverySubcommandAndOption) {
  const auto sections = sections_of_cli_doc();
  const std::map<OptionGroup, std::string> group_sections = {
      {OptionGroup::kGeneral, "Options of every subcommand"},
      {OptionGroup::kOutput, "Options shared by the writing subcommands"},
      {OptionGroup::kMask, "`gradfix mask"},
      {OptionGroup::kModel, "Model subcommands"}};
  for (const auto& [group, heading] : group_sections) {
    const std::string* text = section_of(sections, heading);
    ASSERT_NE(text, nullptr) << "docs/cli.md has no section '" << heading << "'";
    for (const auto& option : group_options(group)) EXPECT_TRUE(documents(*text, option.name)) << "section '" << heading << "' lacks --" << option.name;
  }
  for (const auto& subcommand : subcommands()) {
    const std::string* text = section_of(sections, "`gradfix " + subcommand.name);
    ASSERT_NE(text, nullptr) << "docs/cli.md has no section '`gradfix " << subcommand.name << " ...`'";
    const std::set<std::string> positional(subcommand.positional.begin(), subcommand.positional.end());
    for (const auto& option : subcommand.options) {
      if (positional.count(option.name)) continue;  // documented as FILE, IN, ... in the heading
      // The usage line in the heading counts as documentation too.
      const auto heading = std::find_if(sections.begin(), sections.end(), [&](const auto& entry) { return &entry.second == text; });
      EXPECT_TRUE(documents(*text, option.name) || documents(heading->first, option.name))
          << "docs/cli.md: section of gradfix " << subcommand.name << " lacks --" << option.name;
    }
  }
}

}  // namespace
}  // namespace gradfix
