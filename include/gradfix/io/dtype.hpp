#pragma once
// Element types of stored tensors, named as safetensors names them, and conversions between them.
// Computations run in fp32, or in fp64 when an input or the output is F64; conversions between
// float types round once, to nearest even, so a value the target can hold is copied exactly.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace gradfix {

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU64, kU32, kU16, kU8, kBool, kF8E4M3, kF8E5M2 };

std::size_t dtype_size(DType dtype);
// "F32", "BF16", ... as in a safetensors header.
const char* dtype_name(DType dtype);
std::optional<DType> parse_dtype(const std::string& name);
bool dtype_is_float(DType dtype);
// A float dtype from a user: a safetensors name in any case ("bf16", "F8_E4M3") or PyTorch's
// ("bfloat16", "float8_e4m3fn", as config.json and mergekit write them). nullopt otherwise.
std::optional<DType> parse_float_dtype(const std::string& text);
// PyTorch's name of a float dtype ("bfloat16"), as config.json's torch_dtype holds it.
const char* torch_dtype_name(DType dtype);
// "F64, F32, ..." for messages.
std::string dtype_names();
// The largest finite value of a float dtype (448 for F8_E4M3, 65504 for F16, ...).
double dtype_max_finite(DType dtype);

// Scalar conversions for the two 16-bit float formats; round to nearest even, NaN kept NaN.
float bf16_to_f32(std::uint16_t bits);
std::uint16_t f32_to_bf16(float value);
float f16_to_f32(std::uint16_t bits);
std::uint16_t f32_to_f16(float value);

// The 8-bit float formats: E4M3 as "fn" (no infinity; 0x7F is NaN; largest 448) and E5M2 (IEEE-like,
// largest 57344). As in PyTorch, finite values past the largest saturate to +-448 in E4M3 and
// overflow to infinity in E5M2 (which the jobs refuse unless --allow-nonfinite); an infinite
// value becomes NaN in E4M3.
double f8_to_f64(DType dtype, std::uint8_t bits);
std::uint8_t f64_to_f8(DType dtype, double value);

// NaN and infinite values among `count` elements stored as `dtype` (none in integer types): how
// many, and the index of the first (-1 when there is none).
std::size_t count_nonfinite(DType dtype, const void* values, std::size_t count);
long long first_nonfinite(DType dtype, const void* values, std::size_t count);

// Converts `count` elements stored as `dtype` into fp32.
void convert_to_f32(DType dtype, const void* source, float* target, std::size_t count);
// Converts `count` fp32 values into `dtype`; integer types round to nearest and saturate.
void convert_from_f32(DType dtype, const float* source, void* target, std::size_t count);
// The same in fp64: exact for every dtype but U64/I64 beyond 2^53.
void convert_to_f64(DType dtype, const void* source, double* target, std::size_t count);
void convert_from_f64(DType dtype, const double* source, void* target, std::size_t count);
// Between two float dtypes, or a copy when `from` equals `to` (any dtype): one rounding, to
// nearest even, so a value the target can hold arrives unchanged.
void convert_float(DType from, const void* source, DType to, void* target, std::size_t count);

}  // namespace gradfix
