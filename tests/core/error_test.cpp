// Errors: the internal-error check names the source line and the condition that failed, and
// maps to exit code 3 like the other failures that are not the input's fault.
#include <gtest/gtest.h>

#include <limits>
#include <string>

#include "gradfix/io/error.hpp"

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

// Names from files are printed escaped, hand-checked byte by byte.
TEST(Errors, NamesFromFilesAreEscapedAndUtf8IsChecked) {
  EXPECT_EQ(escaped_name("layers.0.weight"), "layers.0.weight");
  EXPECT_EQ(escaped_name("\x1b[31mred"), "\\x1b[31mred");            // ESC
  EXPECT_EQ(escaped_name("caf\xc3\xa9"), "caf\xc3\xa9");                // valid UTF-8 kept
  EXPECT_EQ(escaped_name("caf\xff\xa9"), "caf\\xff\\xa9");             // invalid bytes
  EXPECT_EQ(escaped_name("a\\b"), "a\\\\b");                           // a backslash doubled
  EXPECT_EQ(escaped_name("x\xc2\x9by"), "x\\xc2\\x9by");               // C1 control (CSI)
  EXPECT_EQ(escaped_name(std::string("n\0m", 3)), "n\\x00m");
  EXPECT_TRUE(is_valid_utf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));
  EXPECT_FALSE(is_valid_utf8("\xc0\xaf"));          // overlong '/'
  EXPECT_FALSE(is_valid_utf8("\xed\xa0\x80"));      // a surrogate
  EXPECT_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));  // past U+10FFFF
  EXPECT_FALSE(is_valid_utf8("\xe2\x82"));          // truncated
  EXPECT_EQ(format_name_list({"\x1b"}), "'\\x1b'");
}

// Numbers in metadata and messages: the shortest text that reads back to the same double.
TEST(Errors, NumbersKeepEveryDigitInTheShortestText) {
  EXPECT_EQ(format_number(1e-7), "1e-07");
  EXPECT_EQ(format_number(0.1), "0.1");
  EXPECT_EQ(format_number(0.5), "0.5");
  EXPECT_EQ(format_number(2.0), "2");
  EXPECT_EQ(format_number(-1.25e300), "-1.25e+300");
  EXPECT_EQ(format_number(std::numeric_limits<double>::infinity()), "inf");
  for (double value : {0.1 + 0.2, 1.0 / 3.0, 123456.789e-20, 1.7976931348623157e308})
    EXPECT_EQ(std::stod(format_number(value)), value) << format_number(value);
}

}  // namespace
}  // namespace gradfix
