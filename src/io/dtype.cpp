#include "gradfix/io/dtype.hpp"

#include <cctype>
#include <cmath>
#include <utility>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "gradfix/io/cpu_clones.hpp"

namespace gradfix {
namespace {

struct DTypeRow {
  DType dtype;
  const char* name;
  std::size_t size;
};

constexpr DTypeRow kDTypes[] = {
    {DType::kF64, "F64", 8},  {DType::kF32, "F32", 4}, {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},  {DType::kI8, "I8", 1},   {DType::kU64, "U64", 8},
    {DType::kU32, "U32", 4},  {DType::kU16, "U16", 2}, {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1}, {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E5M2, "F8_E5M2", 1},
};

const DTypeRow& row(DType dtype) {
  for (const auto& r : kDTypes)
    if (r.dtype == dtype) return r;
  return kDTypes[1];
}

std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

template <typename T>
T round_saturate(double value) {
  if (std::isnan(value)) return T(0);
  const double rounded = std::nearbyint(value);
  if (rounded <= static_cast<double>(std::numeric_limits<T>::lowest())) return std::numeric_limits<T>::lowest();
  if (rounded >= static_cast<double>(std::numeric_limits<T>::max())) return std::numeric_limits<T>::max();
  return static_cast<T>(rounded);
}

template <typename T, typename Wide>
void widen(const void* source, Wide* target, std::size_t count) {
  const T* values = static_cast<const T*>(source);
  for (std::size_t i = 0; i < count; ++i) target[i] = static_cast<Wide>(values[i]);
}

template <typename T, typename Wide>
void narrow_integer(const Wide* source, void* target, std::size_t count) {
  T* values = static_cast<T*>(target);
  for (std::size_t i = 0; i < count; ++i) values[i] = round_saturate<T>(static_cast<double>(source[i]));
}

// The value of each non-negative code of an 8-bit float format, in code order (which is value
// order); NaN codes hold NaN. Encoding is a binary search in this table.
struct F8Table {
  double values[128];
  int largest_finite;  // the code of the largest finite value
};

F8Table make_f8_table(DType dtype) {
  F8Table table{};
  const bool e4m3 = dtype == DType::kF8E4M3;
  const int mantissa_bits = e4m3 ? 3 : 2;
  const int bias = e4m3 ? 7 : 15;
  for (int code = 0; code < 128; ++code) {
    const int exponent = code >> mantissa_bits;
    const int mantissa = code & ((1 << mantissa_bits) - 1);
    const double fraction = static_cast<double>(mantissa) / (1 << mantissa_bits);
    double value;
    if (e4m3 && code == 0x7F) value = std::numeric_limits<double>::quiet_NaN();
    else if (!e4m3 && exponent == 31) value = mantissa == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
    else if (exponent == 0) value = std::ldexp(fraction, 1 - bias);
    else value = std::ldexp(1.0 + fraction, exponent - bias);
    table.values[code] = value;
  }
  table.largest_finite = e4m3 ? 0x7E : 0x7B;
  return table;
}

const F8Table& f8_table(DType dtype) {
  static const F8Table e4m3 = make_f8_table(DType::kF8E4M3);
  static const F8Table e5m2 = make_f8_table(DType::kF8E5M2);
  return dtype == DType::kF8E4M3 ? e4m3 : e5m2;
}

// The nearest float to `value` rounded toward zero, with the lowest mantissa bit set when that
// rounding was inexact ("round to odd"). Rounding this float again to a format with at most 22
// bits of precision gives the correctly rounded result of `value`: no double rounding.
float f64_to_f32_round_odd(double value) {
  float rounded = static_cast<float>(value);
  if (std::isnan(value) || std::isinf(value) || static_cast<double>(rounded) == value) return rounded;
  if (std::fabs(static_cast<double>(rounded)) > std::fabs(value)) rounded = std::nextafter(rounded, 0.0f);
  return bits_float(float_bits(rounded) | 1u);
}

}  // namespace

std::size_t dtype_size(DType dtype) { return row(dtype).size; }
const char* dtype_name(DType dtype) { return row(dtype).name; }

std::optional<DType> parse_dtype(const std::string& name) {
  for (const auto& r : kDTypes)
    if (name == r.name) return r.dtype;
  return std::nullopt;
}

bool dtype_is_float(DType dtype) {
  return dtype == DType::kF64 || dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16 ||
         dtype == DType::kF8E4M3 || dtype == DType::kF8E5M2;
}

std::optional<DType> parse_float_dtype(const std::string& text) {
  std::string upper;
  for (char c : text) upper += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::pair<const char*, DType> kTorchNames[] = {
      {"FLOAT64", DType::kF64}, {"DOUBLE", DType::kF64},         {"FLOAT32", DType::kF32},
      {"FLOAT", DType::kF32},   {"FLOAT16", DType::kF16},        {"HALF", DType::kF16},
      {"BFLOAT16", DType::kBF16}, {"FLOAT8_E4M3FN", DType::kF8E4M3}, {"FLOAT8_E5M2", DType::kF8E5M2}};
  for (const auto& [name, dtype] : kTorchNames)
    if (upper == name) return dtype;
  const auto dtype = parse_dtype(upper);
  if (dtype && dtype_is_float(*dtype)) return dtype;
  return std::nullopt;
}

const char* torch_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF64: return "float64";
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
    case DType::kF8E4M3: return "float8_e4m3fn";
    case DType::kF8E5M2: return "float8_e5m2";
    default: return dtype_name(dtype);
  }
}

std::string dtype_names() {
  std::string names;
  for (const auto& r : kDTypes) names += std::string(names.empty() ? "" : ", ") + r.name;
  return names;
}

double dtype_max_finite(DType dtype) {
  switch (dtype) {
    case DType::kF64: return std::numeric_limits<double>::max();
    case DType::kF32: return std::numeric_limits<float>::max();
    case DType::kF16: return 65504.0;
    case DType::kBF16: return 3.3895313892515355e38;
    case DType::kF8E4M3: return 448.0;
    case DType::kF8E5M2: return 57344.0;
    default: return std::numeric_limits<double>::max();
  }
}

double f8_to_f64(DType dtype, std::uint8_t bits) {
  const double magnitude = f8_table(dtype).values[bits & 0x7F];
  return (bits & 0x80) ? -magnitude : magnitude;
}

std::uint8_t f64_to_f8(DType dtype, double value) {
  const F8Table& table = f8_table(dtype);
  const std::uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  const bool e4m3 = dtype == DType::kF8E4M3;
  if (std::isnan(value)) return static_cast<std::uint8_t>(sign | (e4m3 ? 0x7F : 0x7E));
  const double magnitude = std::fabs(value);
  // The largest code whose value is at most the magnitude.
  int low = 0, high = table.largest_finite;
  if (magnitude >= table.values[high]) {
    low = high;
  } else {
    while (high - low > 1) {
      const int middle = (low + high) / 2;
      (table.values[middle] <= magnitude ? low : high) = middle;
    }
  }
  if (table.values[low] == magnitude) return static_cast<std::uint8_t>(sign | low);
  if (std::isinf(value) && e4m3) return static_cast<std::uint8_t>(sign | 0x7F);
  // Between code `low` and the next; past the largest finite value the next is the one the
  // format would have with one more exponent (480 for E4M3, 65536 for E5M2), which overflows.
  const double next = low < table.largest_finite ? table.values[low + 1]
                                                 : table.values[low] + (table.values[low] - table.values[low - 1]);
  const double halfway = 0.5 * (table.values[low] + next);  // exact: both have few bits
  int code = low;
  if (magnitude > halfway || (magnitude == halfway && (low & 1))) code = low + 1;
  if (code > table.largest_finite) {
    // PyTorch saturates finite E4M3 values at 448 (the format has no infinity); E5M2 overflows to
    // infinity like IEEE types.
    if (e4m3) return static_cast<std::uint8_t>(sign | (std::isinf(value) ? 0x7F : table.largest_finite));
    return static_cast<std::uint8_t>(sign | 0x7C);
  }
  return static_cast<std::uint8_t>(sign | code);
}

float bf16_to_f32(std::uint16_t bits) { return bits_float(static_cast<std::uint32_t>(bits) << 16); }

std::uint16_t f32_to_bf16(float value) {
  const std::uint32_t bits = float_bits(value);
  // Both results, then a select rather than a branch, so that a loop of conversions vectorises.
  const std::uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;  // to nearest even
  const std::uint32_t quiet_nan = (bits >> 16) | 0x0040;                      // a NaN stays a quiet NaN
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<std::uint16_t>(nan ? quiet_nan : rounded);
}

// The bf16 loops of the file jobs (a bf16 apply converts every element three times) have an
// AVX2 copy (GRADFIX_AVX2_CLONE): narrowing 32-bit lanes to 16 takes several shuffles in SSE2.

namespace {

GRADFIX_AVX2_CLONE void bf16_to_f32_loop(const std::uint16_t* source, float* target, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) target[i] = bf16_to_f32(source[i]);
}

GRADFIX_AVX2_CLONE void f32_to_bf16_loop(const float* source, std::uint16_t* target, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) target[i] = f32_to_bf16(source[i]);
}

}  // namespace

float f16_to_f32(std::uint16_t half) {
  const std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000) << 16;
  const std::uint32_t exponent = (half >> 10) & 0x1F;
  std::uint32_t mantissa = half & 0x3FF;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000 | (mantissa << 13));  // Inf or NaN
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // A subnormal half is an ordinary normal float: shift the mantissa up until it is normal.
    int shift = 0;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3FF;
    return bits_float(sign | static_cast<std::uint32_t>(127 - 15 + 1 - shift) << 23 | (mantissa << 13));
  }
  return bits_float(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

std::uint16_t f32_to_f16(float value) {
  const std::uint32_t bits = float_bits(value);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000);
  const std::uint32_t magnitude = bits & 0x7FFFFFFF;
  if (magnitude >= 0x7F800000) {  // Inf or NaN
    return static_cast<std::uint16_t>(sign | 0x7C00 | (magnitude > 0x7F800000 ? 0x200 : 0));
  }
  if (magnitude >= 0x477FF000) return static_cast<std::uint16_t>(sign | 0x7C00);  // rounds past 65504
  if (magnitude < 0x38800000) {
    // Below the smallest normal half: a subnormal or zero, rounded to nearest even.
    if (magnitude < 0x33000000) return sign;  // below half of the smallest subnormal
    const std::uint32_t exponent = magnitude >> 23;
    const std::uint32_t mantissa = (magnitude & 0x7FFFFF) | 0x800000;
    // The value is mantissa * 2^(exponent - 150) and a half subnormal counts units of 2^-24.
    const std::uint32_t shift = 126 - exponent;
    const std::uint32_t half_mantissa = mantissa >> shift;
    const std::uint32_t remainder = mantissa & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    std::uint32_t result = half_mantissa;
    if (remainder > halfway || (remainder == halfway && (half_mantissa & 1))) ++result;
    return static_cast<std::uint16_t>(sign | result);
  }
  // Normal range: rebias the exponent and round the mantissa to 10 bits, nearest even.
  const std::uint32_t rebased = magnitude - ((127 - 15) << 23);
  const std::uint32_t rounded = rebased + 0xFFF + ((rebased >> 13) & 1);
  return static_cast<std::uint16_t>(sign | (rounded >> 13));
}

namespace {

// Widens `count` stored values of any dtype into fp32 or fp64; every value of the narrower types
// is held exactly (F64 into fp32 rounds to nearest, and 64-bit integers past 2^24 / 2^53 round).
template <typename Wide>
void convert_to_wide(DType dtype, const void* source, Wide* target, std::size_t count) {
  switch (dtype) {
    case DType::kF32: widen<float>(source, target, count); return;
    case DType::kF64: widen<double>(source, target, count); return;
    case DType::kF8E4M3:
    case DType::kF8E5M2: {
      const auto* values = static_cast<const std::uint8_t*>(source);
      for (std::size_t i = 0; i < count; ++i) target[i] = static_cast<Wide>(f8_to_f64(dtype, values[i]));
      return;
    }
    case DType::kBF16: {
      const auto* values = static_cast<const std::uint16_t*>(source);
      if constexpr (std::is_same_v<Wide, float>) {
        bf16_to_f32_loop(values, target, count);
      } else {
        for (std::size_t i = 0; i < count; ++i) target[i] = bf16_to_f32(values[i]);
      }
      return;
    }
    case DType::kF16: {
      const auto* values = static_cast<const std::uint16_t*>(source);
      for (std::size_t i = 0; i < count; ++i) target[i] = f16_to_f32(values[i]);
      return;
    }
    case DType::kI64: widen<std::int64_t>(source, target, count); return;
    case DType::kI32: widen<std::int32_t>(source, target, count); return;
    case DType::kI16: widen<std::int16_t>(source, target, count); return;
    case DType::kI8: widen<std::int8_t>(source, target, count); return;
    case DType::kU64: widen<std::uint64_t>(source, target, count); return;
    case DType::kU32: widen<std::uint32_t>(source, target, count); return;
    case DType::kU16: widen<std::uint16_t>(source, target, count); return;
    case DType::kU8:
    case DType::kBool: widen<std::uint8_t>(source, target, count); return;
  }
}

}  // namespace

void convert_to_f32(DType dtype, const void* source, float* target, std::size_t count) {
  if (dtype == DType::kF32) {
    std::memcpy(target, source, count * sizeof(float));
    return;
  }
  convert_to_wide(dtype, source, target, count);
}


namespace {

// Calls visit(i) for each non-finite element, in order, until it returns false.
template <typename Visit>
void visit_nonfinite(DType dtype, const void* values, std::size_t count, Visit visit) {
  auto scan = [&](auto is_bad, auto element_type) {
    using E = decltype(element_type);
    const E* data = static_cast<const E*>(values);
    for (std::size_t i = 0; i < count; ++i)
      if (is_bad(data[i]) && !visit(i)) return;
  };
  switch (dtype) {
    case DType::kF64: scan([](double v) { return !std::isfinite(v); }, double{}); return;
    case DType::kF32: scan([](float v) { return !std::isfinite(v); }, float{}); return;
    case DType::kF16: scan([](std::uint16_t v) { return (v & 0x7C00) == 0x7C00; }, std::uint16_t{}); return;
    case DType::kBF16: scan([](std::uint16_t v) { return (v & 0x7F80) == 0x7F80; }, std::uint16_t{}); return;
    case DType::kF8E4M3: scan([](std::uint8_t v) { return (v & 0x7F) == 0x7F; }, std::uint8_t{}); return;
    case DType::kF8E5M2: scan([](std::uint8_t v) { return (v & 0x7C) == 0x7C; }, std::uint8_t{}); return;
    default: return;  // integers are always finite
  }
}

}  // namespace

// The number of non-finite elements as a plain reduction (vectorised); the common answer is 0.
template <typename E, typename IsBad>
std::size_t count_bad(const void* values, std::size_t count, IsBad is_bad) {
  const E* data = static_cast<const E*>(values);
  std::size_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (std::size_t i = 0; i < count; ++i) bad += is_bad(data[i]) ? 1 : 0;
  return bad;
}

GRADFIX_AVX2_CLONE std::size_t count_nonfinite(DType dtype, const void* values, std::size_t count) {
  switch (dtype) {
    case DType::kF64: return count_bad<std::uint64_t>(values, count, [](std::uint64_t v) { return (v & 0x7FF0000000000000ull) == 0x7FF0000000000000ull; });
    case DType::kF32: return count_bad<std::uint32_t>(values, count, [](std::uint32_t v) { return (v & 0x7F800000u) == 0x7F800000u; });
    case DType::kF16: return count_bad<std::uint16_t>(values, count, [](std::uint16_t v) { return (v & 0x7C00) == 0x7C00; });
    case DType::kBF16: return count_bad<std::uint16_t>(values, count, [](std::uint16_t v) { return (v & 0x7F80) == 0x7F80; });
    case DType::kF8E4M3: return count_bad<std::uint8_t>(values, count, [](std::uint8_t v) { return (v & 0x7F) == 0x7F; });
    case DType::kF8E5M2: return count_bad<std::uint8_t>(values, count, [](std::uint8_t v) { return (v & 0x7C) == 0x7C; });
    default: return 0;  // integers are always finite
  }
}

long long first_nonfinite(DType dtype, const void* values, std::size_t count) {
  // One vectorised pass answers the common case (none); only a chunk with one looks for it.
  if (count_nonfinite(dtype, values, count) == 0) return -1;
  long long first = -1;
  visit_nonfinite(dtype, values, count, [&](std::size_t i) { return first = static_cast<long long>(i), false; });
  return first;
}

void convert_to_f64(DType dtype, const void* source, double* target, std::size_t count) {
  if (dtype == DType::kF64) {
    std::memcpy(target, source, count * sizeof(double));
    return;
  }
  convert_to_wide(dtype, source, target, count);
}

namespace {

// The value a 16-bit float conversion starts from: a float as it is; a double rounded to odd, so
// that the one rounding to 16 bits is the correct rounding of the double.
float narrowing_start(float value) { return value; }
float narrowing_start(double value) { return f64_to_f32_round_odd(value); }

// Converts fp32 or fp64 values into any dtype: floats round to nearest even (once), integers
// round to nearest and saturate, BOOL is value != 0.
template <typename Wide>
void convert_from_wide(DType dtype, const Wide* source, void* target, std::size_t count) {
  switch (dtype) {
    case DType::kF64: widen<Wide>(source, static_cast<double*>(target), count); return;
    case DType::kF32: {
      auto* values = static_cast<float*>(target);
      for (std::size_t i = 0; i < count; ++i) values[i] = static_cast<float>(source[i]);
      return;
    }
    case DType::kBF16: {
      auto* values = static_cast<std::uint16_t*>(target);
      if constexpr (std::is_same_v<Wide, float>) {
        f32_to_bf16_loop(source, values, count);
      } else {
        for (std::size_t i = 0; i < count; ++i) values[i] = f32_to_bf16(narrowing_start(source[i]));
      }
      return;
    }
    case DType::kF16: {
      auto* values = static_cast<std::uint16_t*>(target);
      for (std::size_t i = 0; i < count; ++i) values[i] = f32_to_f16(narrowing_start(source[i]));
      return;
    }
    case DType::kF8E4M3:
    case DType::kF8E5M2: {
      auto* values = static_cast<std::uint8_t*>(target);
      for (std::size_t i = 0; i < count; ++i) values[i] = f64_to_f8(dtype, static_cast<double>(source[i]));
      return;
    }
    case DType::kI64: narrow_integer<std::int64_t>(source, target, count); return;
    case DType::kI32: narrow_integer<std::int32_t>(source, target, count); return;
    case DType::kI16: narrow_integer<std::int16_t>(source, target, count); return;
    case DType::kI8: narrow_integer<std::int8_t>(source, target, count); return;
    case DType::kU64: narrow_integer<std::uint64_t>(source, target, count); return;
    case DType::kU32: narrow_integer<std::uint32_t>(source, target, count); return;
    case DType::kU16: narrow_integer<std::uint16_t>(source, target, count); return;
    case DType::kU8: narrow_integer<std::uint8_t>(source, target, count); return;
    case DType::kBool: {
      auto* values = static_cast<std::uint8_t*>(target);
      for (std::size_t i = 0; i < count; ++i) values[i] = source[i] != Wide(0) ? 1 : 0;
      return;
    }
  }
}

}  // namespace

void convert_from_f32(DType dtype, const float* source, void* target, std::size_t count) {
  if (dtype == DType::kF32) {
    std::memcpy(target, source, count * sizeof(float));
    return;
  }
  convert_from_wide(dtype, source, target, count);
}

void convert_from_f64(DType dtype, const double* source, void* target, std::size_t count) {
  if (dtype == DType::kF64) {
    std::memcpy(target, source, count * sizeof(double));
    return;
  }
  convert_from_wide(dtype, source, target, count);
}

void convert_float(DType from, const void* source, DType to, void* target, std::size_t count) {
  if (from == to) {
    std::memcpy(target, source, count * dtype_size(from));
    return;
  }
  if (to == DType::kF64) {
    convert_to_f64(from, source, static_cast<double*>(target), count);
    return;
  }
  if (from == DType::kF64) {
    convert_from_f64(to, static_cast<const double*>(source), target, count);
    return;
  }
  // Every other float type widens to fp32 exactly, so one rounding follows.
  std::vector<float> wide(count);
  convert_to_f32(from, source, wide.data(), count);
  convert_from_f32(to, wide.data(), target, count);
}

}  // namespace gradfix
