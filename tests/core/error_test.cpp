// Errors: the internal-error check names the source line and the condition that failed, and
// maps to exit code 3 like the other failures that are not the input's fault.
#include <gtest/gtest.h>

#include "gradfix/core/error.hpp"

namespace gradfix {
namespace {

constexpr int kCheckLine = __LINE__ + 3;

int checked_half(int value) {
  GRADFIX_CHECK(value % 2 == 0, "odd value " + std::to_string(value));
  return value / 2;
}

TEST(InternalError, NamesFileLineAndCondition) {
  EXPECT_EQ(checked_half(8), 4);
  try {
    checked_half(7);
    FAIL() << "the check passed an odd value";
  } catch (const InternalError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("internal error at "), std::string::npos) << message;
    EXPECT_NE(message.find("error_test.cpp:" + std::to_string(kCheckLine) + ":"), std::string::npos) << message;
    EXPECT_NE(message.find("check 'value % 2 == 0' failed: odd value 7"), std::string::npos) << message;
    EXPECT_EQ(error.exit_code(), kExitRuntimeFailure);
    EXPECT_FALSE(error.agreed());
  }
}

TEST(Errors, KindsMapToExitCodes) {
  EXPECT_EQ(InputError("x").exit_code(), kExitBadInput);
  EXPECT_EQ(RuntimeFailure("x").exit_code(), kExitRuntimeFailure);
  const PeerFailure peer("stopped", kExitBadInput);
  EXPECT_TRUE(peer.silent());
  EXPECT_TRUE(peer.agreed());
  EXPECT_EQ(format_shape({768, 3072}), "[768, 3072]");
  EXPECT_EQ(format_name_list({"a", "b", "c"}, 2), "'a', 'b' and 1 more");
}

}  // namespace
}  // namespace gradfix
