#pragma once
// Element types of stored tensors, named as safetensors names them, and conversion to and from
// fp32, the type every computation in gradfix runs in.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace gradfix {

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU64, kU32, kU16, kU8, kBool };

std::size_t dtype_size(DType dtype);
// "F32", "BF16", ... as in a safetensors header.
const char* dtype_name(DType dtype);
std::optional<DType> parse_dtype(const std::string& name);
bool dtype_is_float(DType dtype);

// Scalar conversions for the two 16-bit float formats; round to nearest even, NaN kept NaN.
float bf16_to_f32(std::uint16_t bits);
std::uint16_t f32_to_bf16(float value);
float f16_to_f32(std::uint16_t bits);
std::uint16_t f32_to_f16(float value);

// Converts `count` elements stored as `dtype` into fp32.
void convert_to_f32(DType dtype, const void* source, float* target, std::size_t count);
// Converts `count` fp32 values into `dtype`; integer types round to nearest and saturate.
void convert_from_f32(DType dtype, const float* source, void* target, std::size_t count);

}  // namespace gradfix
