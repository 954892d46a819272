#include "gradfix/core/dtype.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace gradfix {
namespace {

TEST(DType, NamesAndSizesRoundTrip) {
  for (const char* name : {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}) {
    const auto dtype = parse_dtype(name);
    ASSERT_TRUE(dtype.has_value()) << name;
    EXPECT_STREQ(dtype_name(*dtype), name);
  }
  EXPECT_FALSE(parse_dtype("F8_E4M3").has_value());
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
  EXPECT_EQ(dtype_size(DType::kF64), 8u);
  EXPECT_EQ(dtype_size(DType::kBool), 1u);
}

TEST(DType, Bf16HandCheckedValues) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  // 1 + 3 * 2^-8 lies between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up to the even one.
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::infinity())), std::numeric_limits<float>::infinity());
}

TEST(DType, F16HandCheckedValues) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xC000);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);          // largest finite half
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);          // rounds to infinity
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // half of it: ties to even, zero
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -24)), 0x0002);  // 1.5 units: ties to even, 2
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x3555), 0.333251953125f);
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::numeric_limits<float>::quiet_NaN()))));
}

// Every one of the 65536 half bit patterns survives f16 -> f32 -> f16 (NaNs stay NaN).
TEST(DType, F16RoundTripsExhaustively) {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const float value = f16_to_f32(static_cast<std::uint16_t>(bits));
    if (std::isnan(value)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(value))));
      continue;
    }
    ASSERT_EQ(f32_to_f16(value), bits) << "bits " << bits;
  }
}

TEST(DType, Bf16RoundTripsExhaustively) {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const float value = bf16_to_f32(static_cast<std::uint16_t>(bits));
    if (std::isnan(value)) continue;
    ASSERT_EQ(f32_to_bf16(value), bits) << "bits " << bits;
  }
}

// Against the nearest representable value found by brute force over all halves.
TEST(DType, F16RoundsToNearest) {
  std::vector<float> halves;
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const float candidate = f16_to_f32(static_cast<std::uint16_t>(bits));
    if (std::isfinite(candidate)) halves.push_back(candidate);
  }
  auto check = [&](float value) {
    float best = std::numeric_limits<float>::infinity();
    for (float candidate : halves)
      if (std::fabs(candidate - value) < std::fabs(best - value)) best = candidate;
    const float converted = f16_to_f32(f32_to_f16(value));
    ASSERT_EQ(std::fabs(converted - value), std::fabs(best - value)) << value;
  };
  for (float value = -65000.0f; value < 65000.0f; value += 97.31f) check(value);
  for (float value = -1e-4f; value < 1e-4f; value += 1.37e-7f) check(value);  // subnormal range
}

TEST(DType, IntegerConversionsRoundAndSaturate) {
  const std::vector<float> values = {-1000.0f, -2.5f, -0.4f, 0.6f, 126.5f, 1000.0f};
  std::int8_t narrow[6];
  convert_from_f32(DType::kI8, values.data(), narrow, values.size());
  EXPECT_EQ(narrow[0], -128);
  EXPECT_EQ(narrow[1], -2);  // nearest even
  EXPECT_EQ(narrow[2], 0);
  EXPECT_EQ(narrow[3], 1);
  EXPECT_EQ(narrow[4], 126);
  EXPECT_EQ(narrow[5], 127);
  std::int32_t wide[3] = {-7, 0, 123456};
  float back[3];
  convert_to_f32(DType::kI32, wide, back, 3);
  EXPECT_EQ(back[0], -7.0f);
  EXPECT_EQ(back[2], 123456.0f);
}

}  // namespace
}  // namespace gradfix
