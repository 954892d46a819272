// Tensor selection by RE2 patterns: search semantics, include and exclude, bad patterns, and the
// inputs that crashed or hung the backtracking engine used before (a 100,000-character name, a
// nested quantifier): RE2 answers them at once.
#include <gtest/gtest.h>

#include "gradfix/io/error.hpp"
#include "gradfix/io/select.hpp"

namespace gradfix {
namespace {

TEST(TensorSelector, SearchesAnywhereIncludeThenExclude) {
  const TensorSelector all;
  EXPECT_TRUE(all.selects("model.layers.0.self_attn.q_proj.weight"));
  const TensorSelector attention({"attn"}, {"bias$"});
  EXPECT_TRUE(attention.selects("model.layers.0.self_attn.q_proj.weight"));
  EXPECT_FALSE(attention.selects("model.layers.0.self_attn.q_proj.bias"));
  EXPECT_FALSE(attention.selects("model.layers.0.mlp.up_proj.weight"));
  const TensorSelector anchored({"^layers\\.\\d+\\.weight$"}, {});
  EXPECT_TRUE(anchored.selects("layers.12.weight"));
  EXPECT_FALSE(anchored.selects("xlayers.12.weight"));
  EXPECT_FALSE(anchored.selects("layers.x.weight"));
}

TEST(TensorSelector, BadPatternNamesTheOptionAndPattern) {
  try {
    TensorSelector({"(unclosed"}, {});
    FAIL() << "a bad pattern was accepted";
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("--include pattern '(unclosed'"), std::string::npos) << error.what();
  }
  EXPECT_THROW(TensorSelector({}, {"a{2,1}"}), InputError);
}

TEST(TensorSelector, LongNamesAndNestedQuantifiersStayLinear) {
  const std::string long_name(100000, 'a');
  EXPECT_TRUE(TensorSelector({"a.*a"}, {}).selects(long_name));
  EXPECT_TRUE(TensorSelector({}, {"(x|y)+$"}).selects(long_name));
  // Exponential for a backtracking engine on a 31-character name that almost matches.
  const std::string almost = std::string(30, 'a') + "!";
  EXPECT_FALSE(TensorSelector({"^(a+)+$"}, {}).selects(almost));
  EXPECT_FALSE(TensorSelector({"^(a+)+$"}, {}).selects(long_name + "!"));
}

}  // namespace
}  // namespace gradfix
