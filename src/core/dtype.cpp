#include "gradfix/core/dtype.hpp"

#include <cmath>
#include <cstring>
#include <limits>

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
    {DType::kBool, "BOOL", 1},
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
T round_saturate(float value) {
  if (std::isnan(value)) return T(0);
  const double rounded = std::nearbyint(static_cast<double>(value));
  if (rounded <= static_cast<double>(std::numeric_limits<T>::lowest())) return std::numeric_limits<T>::lowest();
  if (rounded >= static_cast<double>(std::numeric_limits<T>::max())) return std::numeric_limits<T>::max();
  return static_cast<T>(rounded);
}

template <typename T>
void widen(const void* source, float* target, std::size_t count) {
  const T* values = static_cast<const T*>(source);
  for (std::size_t i = 0; i < count; ++i) target[i] = static_cast<float>(values[i]);
}

template <typename T>
void narrow_integer(const float* source, void* target, std::size_t count) {
  T* values = static_cast<T*>(target);
  for (std::size_t i = 0; i < count; ++i) values[i] = round_saturate<T>(source[i]);
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
  return dtype == DType::kF64 || dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

float bf16_to_f32(std::uint16_t bits) { return bits_float(static_cast<std::uint32_t>(bits) << 16); }

std::uint16_t f32_to_bf16(float value) {
  const std::uint32_t bits = float_bits(value);
  if (std::isnan(value)) return static_cast<std::uint16_t>((bits >> 16) | 0x0040);  // stay a quiet NaN
  const std::uint32_t rounding = 0x7FFF + ((bits >> 16) & 1);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

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

void convert_to_f32(DType dtype, const void* source, float* target, std::size_t count) {
  switch (dtype) {
    case DType::kF32: std::memcpy(target, source, count * sizeof(float)); return;
    case DType::kF64: widen<double>(source, target, count); return;
    case DType::kBF16: {
      const auto* values = static_cast<const std::uint16_t*>(source);
      for (std::size_t i = 0; i < count; ++i) target[i] = bf16_to_f32(values[i]);
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

void convert_from_f32(DType dtype, const float* source, void* target, std::size_t count) {
  switch (dtype) {
    case DType::kF32: std::memcpy(target, source, count * sizeof(float)); return;
    case DType::kF64: {
      auto* values = static_cast<double*>(target);
      for (std::size_t i = 0; i < count; ++i) values[i] = source[i];
      return;
    }
    case DType::kBF16: {
      auto* values = static_cast<std::uint16_t*>(target);
      for (std::size_t i = 0; i < count; ++i) values[i] = f32_to_bf16(source[i]);
      return;
    }
    case DType::kF16: {
      auto* values = static_cast<std::uint16_t*>(target);
      for (std::size_t i = 0; i < count; ++i) values[i] = f32_to_f16(source[i]);
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
      for (std::size_t i = 0; i < count; ++i) values[i] = source[i] != 0.0f ? 1 : 0;
      return;
    }
  }
}

}  // namespace gradfix
