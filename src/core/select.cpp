#include "gradfix/core/select.hpp"

#include "gradfix/core/error.hpp"

namespace gradfix {
namespace {

std::vector<std::regex> compile(const std::vector<std::string>& patterns, const char* option) {
  std::vector<std::regex> compiled;
  for (const auto& pattern : patterns) {
    try {
      compiled.emplace_back(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error& error) {
      throw InputError(std::string("--") + option + " pattern '" + pattern + "' is not a valid regular expression: " + error.what());
    }
  }
  return compiled;
}

bool any_match(const std::vector<std::regex>& patterns, const std::string& name) {
  for (const auto& pattern : patterns)
    if (std::regex_search(name, pattern)) return true;
  return false;
}

}  // namespace

TensorSelector::TensorSelector(const std::vector<std::string>& include, const std::vector<std::string>& exclude)
    : include_(compile(include, "include")), exclude_(compile(exclude, "exclude")) {}

bool TensorSelector::selects(const std::string& name) const {
  if (!include_.empty() && !any_match(include_, name)) return false;
  return !any_match(exclude_, name);
}

}  // namespace gradfix
