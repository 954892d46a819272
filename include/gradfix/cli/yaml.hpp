#pragma once
// YAML configuration files (mergekit's merge configs) read into JSON values, with libyaml. Plain
// scalars are typed as YAML 1.1 (PyYAML, and so mergekit) types them: true/yes/on, null/~,
// integers, floats; quoted scalars stay strings. Files come from strangers: aliases are refused
// (they can expand a small file into a huge tree), nesting and node count are bounded, a key
// given twice is an error, and every error names the file and line.

#include <nlohmann/json.hpp>
#include <string>

namespace gradfix {

nlohmann::json parse_yaml(const std::string& text, const std::string& path);

}  // namespace gradfix
