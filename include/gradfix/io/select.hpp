#pragma once
// Which tensors an operation acts on: every name matching at least one --include pattern (all
// names when none is given) and no --exclude pattern. Patterns are RE2 regular expressions
// searched anywhere in the name, so "attn" selects every attention tensor. Names and patterns
// come from users and checkpoints: RE2 matches in time linear in the name and in bounded
// memory, where a backtracking engine can take exponential time or overflow its stack.

#include <memory>
#include <string>
#include <vector>

namespace re2 {
class RE2;
}

namespace gradfix {

class TensorSelector {
 public:
  TensorSelector() = default;
  // Throws InputError naming the pattern when one does not compile.
  TensorSelector(const std::vector<std::string>& include, const std::vector<std::string>& exclude);
  bool selects(const std::string& name) const;

 private:
  std::vector<std::shared_ptr<const re2::RE2>> include_;
  std::vector<std::shared_ptr<const re2::RE2>> exclude_;
};

// `name` as a pattern that matches exactly that name: anchored, metacharacters escaped.
std::string exact_pattern(const std::string& name);

}  // namespace gradfix
