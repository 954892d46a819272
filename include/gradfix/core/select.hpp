#pragma once
// Which tensors an operation acts on: every name matching at least one --include pattern (all
// names when none is given) and no --exclude pattern. Patterns are ECMAScript regular expressions
// searched anywhere in the name, so "attn" selects every attention tensor.

#include <regex>
#include <string>
#include <vector>

namespace gradfix {

class TensorSelector {
 public:
  TensorSelector() = default;
  // Throws InputError naming the pattern when one does not compile.
  TensorSelector(const std::vector<std::string>& include, const std::vector<std::string>& exclude);
  bool selects(const std::string& name) const;

 private:
  std::vector<std::regex> include_;
  std::vector<std::regex> exclude_;
};

}  // namespace gradfix
