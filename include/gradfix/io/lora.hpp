#pragma once
// A PEFT LoRA adapter (a directory with adapter_config.json and adapter_model.safetensors) read as
// a task vector: for each adapted module, delta_W = (lora_alpha / r) * B @ A (lora_alpha / sqrt(r)
// with use_rslora; alpha_pattern per module; transposed for fan_in_fan_out layers and
// embeddings), named after the base weight it changes ("model.layers.0.self_attn.q_proj.weight").
// Elements are computed when a range is read, so a rank materialises only its own chunks, never
// the whole delta. Variants that are not this sum (DoRA, LoRA biases, saved modules) are refused.

#include <memory>
#include <string>

#include "gradfix/io/tensor_store.hpp"

namespace gradfix {

// Whether `path` is a directory holding adapter_config.json.
bool is_lora_adapter(const std::string& path);
std::unique_ptr<TensorReader> open_lora_reader(const std::string& directory);

}  // namespace gradfix
