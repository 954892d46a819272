#include "gradfix/io/select.hpp"

#include <re2/re2.h>

#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

// A pattern's compiled program may use at most this much memory; larger ones are refused.
constexpr int64_t kMaxPatternMemory = 8 << 20;

std::vector<std::shared_ptr<const re2::RE2>> compile(const std::vector<std::string>& patterns, const char* option) {
  std::vector<std::shared_ptr<const re2::RE2>> compiled;
  for (const auto& pattern : patterns) {
    RE2::Options options;
    options.set_log_errors(false);
    options.set_max_mem(kMaxPatternMemory);
    auto regex = std::make_shared<const re2::RE2>(pattern, options);
    if (!regex->ok())
      throw InputError(std::string("--") + option + " pattern '" + pattern + "' is not a valid RE2 regular expression: " + regex->error() +
                       " (syntax: docs/cli.md)");
    compiled.push_back(std::move(regex));
  }
  return compiled;
}

bool any_match(const std::vector<std::shared_ptr<const re2::RE2>>& patterns, const std::string& name) {
  for (const auto& pattern : patterns)
    if (RE2::PartialMatch(name, *pattern)) return true;
  return false;
}

}  // namespace

TensorSelector::TensorSelector(const std::vector<std::string>& include, const std::vector<std::string>& exclude)
    : include_(compile(include, "include")), exclude_(compile(exclude, "exclude")) {}

bool TensorSelector::selects(const std::string& name) const {
  if (!include_.empty() && !any_match(include_, name)) return false;
  return !any_match(exclude_, name);
}

std::string exact_pattern(const std::string& name) { return "^" + re2::RE2::QuoteMeta(name) + "$"; }

}  // namespace gradfix
