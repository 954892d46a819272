#include "gradfix/io/dtype.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace gradfix {
namespace {

TEST(DType, NamesAndSizesRoundTrip) {
  for (const char* name : {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
                           "F8_E4M3", "F8_E5M2"}) {
    const auto dtype = parse_dtype(name);
    ASSERT_TRUE(dtype.has_value()) << name;
    EXPECT_STREQ(dtype_name(*dtype), name);
  }
  EXPECT_FALSE(parse_dtype("F4").has_value());
  EXPECT_EQ(dtype_size(DType::kF8E4M3), 1u);
  // Users and mergekit configs name float dtypes PyTorch's way too; integers are not float dtypes.
  EXPECT_EQ(parse_float_dtype("bfloat16"), DType::kBF16);
  EXPECT_EQ(parse_float_dtype("bf16"), DType::kBF16);
  EXPECT_EQ(parse_float_dtype("float8_e4m3fn"), DType::kF8E4M3);
  EXPECT_EQ(parse_float_dtype("Float32"), DType::kF32);
  EXPECT_FALSE(parse_float_dtype("I64").has_value());
  EXPECT_STREQ(torch_dtype_name(DType::kBF16), "bfloat16");
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

// The 8-bit float formats by hand (OCP FP8: E4M3 with bias 7, no infinity, 0x7F NaN; E5M2 with
// bias 15, IEEE-like).
TEST(DType, Fp8HandCheckedValues) {
  EXPECT_EQ(f8_to_f64(DType::kF8E4M3, 0x38), 1.0);    // exponent 7, mantissa 0
  EXPECT_EQ(f8_to_f64(DType::kF8E4M3, 0x7E), 448.0);  // the largest finite value
  EXPECT_EQ(f8_to_f64(DType::kF8E4M3, 0x01), std::ldexp(1.0, -9));  // the smallest subnormal
  EXPECT_EQ(f8_to_f64(DType::kF8E4M3, 0xB8), -1.0);
  EXPECT_TRUE(std::isnan(f8_to_f64(DType::kF8E4M3, 0x7F)));
  EXPECT_EQ(f8_to_f64(DType::kF8E5M2, 0x3C), 1.0);
  EXPECT_EQ(f8_to_f64(DType::kF8E5M2, 0x7B), 57344.0);
  EXPECT_TRUE(std::isinf(f8_to_f64(DType::kF8E5M2, 0x7C)));
  EXPECT_EQ(f64_to_f8(DType::kF8E4M3, 1.0), 0x38);
  // 1.0625 is halfway between 1 (0x38, even) and 1.125 (0x39): ties go to even.
  EXPECT_EQ(f64_to_f8(DType::kF8E4M3, 1.0625), 0x38);
  EXPECT_EQ(f64_to_f8(DType::kF8E4M3, 1.0626), 0x39);
  // Past 448, finite values saturate (PyTorch's rule); infinity, which E4M3 lacks, is NaN.
  EXPECT_EQ(f64_to_f8(DType::kF8E4M3, 464.0), 0x7E);
  EXPECT_EQ(f64_to_f8(DType::kF8E4M3, 465.0), 0x7E);
  EXPECT_EQ(f64_to_f8(DType::kF8E4M3, -1e9), 0xFE);
  EXPECT_EQ(f64_to_f8(DType::kF8E4M3, -std::numeric_limits<double>::infinity()), 0xFF);
  // Half the smallest subnormal ties to zero (even); a bit more rounds up to it.
  EXPECT_EQ(f64_to_f8(DType::kF8E4M3, std::ldexp(1.0, -10)), 0x00);
  EXPECT_EQ(f64_to_f8(DType::kF8E4M3, std::ldexp(1.5, -10)), 0x01);
  EXPECT_EQ(f64_to_f8(DType::kF8E5M2, 61440.0), 0x7C);  // halfway to 65536: ties to even, infinity
  EXPECT_EQ(f64_to_f8(DType::kF8E5M2, 61439.0), 0x7B);
  // Every finite code survives the round trip, with its sign.
  for (DType dtype : {DType::kF8E4M3, DType::kF8E5M2})
    for (int code = 0; code < 256; ++code) {
      const double value = f8_to_f64(dtype, static_cast<std::uint8_t>(code));
      if (std::isnan(value)) continue;
      EXPECT_EQ(f64_to_f8(dtype, value), code) << dtype_name(dtype) << " code " << code;
    }
}

// Conversions round once: a double just above a bf16 halfway point must round up, which the
// route through fp32 (where it becomes exactly the halfway point, then ties to even) gets wrong.
TEST(DType, F64ToNarrowRoundsOnce) {
  const double above_half = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  std::uint16_t bits = 0;
  convert_from_f64(DType::kBF16, &above_half, &bits, 1);
  EXPECT_EQ(bits, f32_to_bf16(1.0f + std::ldexp(1.0f, -7)));
  const double above_half16 = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  convert_from_f64(DType::kF16, &above_half16, &bits, 1);
  EXPECT_EQ(f16_to_f32(bits), 1.0f + std::ldexp(1.0f, -10));
  // Exact values pass unchanged between every pair of float types that holds them.
  const std::vector<DType> floats = {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kF8E5M2};
  const double exact[] = {0.0, -0.0, 1.0, -1.5, 0.25, 448.0 / 2, -3.0};
  for (DType from : floats)
    for (DType to : floats) {
      std::vector<unsigned char> source(sizeof exact / sizeof exact[0] * dtype_size(from));
      std::vector<unsigned char> target(sizeof exact / sizeof exact[0] * dtype_size(to));
      convert_from_f64(from, exact, source.data(), 7);
      convert_float(from, source.data(), to, target.data(), 7);
      std::vector<double> back(7);
      convert_to_f64(to, target.data(), back.data(), 7);
      for (int i = 0; i < 7; ++i) EXPECT_EQ(back[i], exact[i]) << dtype_name(from) << " -> " << dtype_name(to);
    }
  // F64 values beyond fp32 survive an F64 copy; counted as non-finite only once they overflow.
  const double wide[] = {1.0 / 3.0, 1e-300, 1e300};
  double copied[3];
  convert_float(DType::kF64, wide, DType::kF64, copied, 3);
  EXPECT_EQ(std::memcmp(wide, copied, sizeof wide), 0);
  EXPECT_EQ(count_nonfinite(DType::kF64, wide, 3), 0u);
  float narrowed[3];
  convert_float(DType::kF64, wide, DType::kF32, narrowed, 3);
  EXPECT_EQ(count_nonfinite(DType::kF32, narrowed, 3), 1u);
  EXPECT_EQ(first_nonfinite(DType::kF32, narrowed, 3), 2);
}

// The bulk bf16 conversions (vectorised, with an AVX2 copy) agree with the one-element functions
// on every kind of float: random bit patterns, NaNs with payloads (signalling ones become quiet),
// infinities, the largest finite value (which rounds to infinity) and subnormals.
TEST(DType, BulkBf16ConversionsMatchTheElementFunctions) {
  std::vector<std::uint32_t> bits = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7F800001u, 0xFFC00001u,
                                     0x7FBFFFFFu, 0x7F7FFFFFu, 0x00000001u, 0x807FFFFFu, 0x3F808000u, 0x3F818000u};
  std::uint64_t state = 12345;
  for (int i = 0; i < 100000; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    bits.push_back(static_cast<std::uint32_t>(state >> 32));
  }
  std::vector<float> values(bits.size());
  std::memcpy(values.data(), bits.data(), bits.size() * sizeof(float));
  std::vector<std::uint16_t> narrowed(values.size());
  convert_from_f32(DType::kBF16, values.data(), narrowed.data(), values.size());
  for (std::size_t i = 0; i < values.size(); ++i) ASSERT_EQ(narrowed[i], f32_to_bf16(values[i])) << "bits " << bits[i];
  EXPECT_EQ(narrowed[4], 0x7FC0);  // a signalling NaN comes out quiet
  EXPECT_EQ(narrowed[7], 0x7F80);  // the largest float rounds to infinity
  std::vector<float> widened(narrowed.size());
  convert_to_f32(DType::kBF16, narrowed.data(), widened.data(), narrowed.size());
  for (std::size_t i = 0; i < narrowed.size(); ++i) {
    const float expected = bf16_to_f32(narrowed[i]);
    ASSERT_EQ(std::memcmp(&widened[i], &expected, sizeof(float)), 0) << "bf16 bits " << narrowed[i];
  }
}

// The vectorised non-finite count agrees with a brute-force scan, in every float dtype, and
// first_nonfinite finds the first.
TEST(DType, NonfiniteCountsMatchABruteForceScan) {
  std::vector<unsigned char> bytes(64 * 1024);
  std::uint64_t state = 99;
  for (auto& byte : bytes) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    byte = static_cast<unsigned char>(state >> 56);
  }
  for (DType dtype : {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kF8E5M2}) {
    const std::size_t size = dtype_size(dtype), count = bytes.size() / size;
    std::vector<double> wide(count);
    convert_to_f64(dtype, bytes.data(), wide.data(), count);
    std::size_t expected = 0;
    long long first = -1;
    for (std::size_t i = 0; i < count; ++i)
      if (!std::isfinite(wide[i])) {
        ++expected;
        if (first < 0) first = static_cast<long long>(i);
      }
    EXPECT_GT(expected, 0u) << dtype_name(dtype);
    EXPECT_EQ(count_nonfinite(dtype, bytes.data(), count), expected) << dtype_name(dtype);
    EXPECT_EQ(first_nonfinite(dtype, bytes.data(), count), first) << dtype_name(dtype);
  }
}

}  // namespace
}  // namespace gradfix
