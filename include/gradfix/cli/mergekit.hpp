#pragma once
// mergekit's YAML merge configuration, for the methods gradfix has: linear, task_arithmetic, ties,
// dare_ties and dare_linear (mergekit's rules, see ModelMergeJob). Read: merge_method, base_model,
// models (each `model` with `parameters: {weight, density}`), parameters (normalize, lambda,
// rescale; int8_mask accepted and ignored), dtype, out_dtype, tokenizer_source (base, or absent),
// and a `gradfix:` section for what mergekit lacks (seed: DARE's draws). Anything
// else (another method, slices, per-layer parameter lists, filters, LoRA "model+adapter" names,
// an unknown key) is refused with an error naming it.

#include <string>

#include "gradfix/jobs/jobs.hpp"

namespace gradfix {

bool is_yaml_path(const std::string& path);
// Relative model paths are taken from the current directory, as mergekit takes them.
ModelMergeJob mergekit_job(const std::string& path);

}  // namespace gradfix
