#pragma once
// mergekit's YAML merge configuration (docs/merging.md has every key and method). Read:
// merge_method, base_model, models (each `model` with its parameters), parameters (the merge's,
// and the models' defaults), dtype, out_dtype, tokenizer_source (base, or absent), and a `gradfix:`
// section for what mergekit lacks (seed: DARE's and DELLA's draws; masks). weight, density, gamma, epsilon, t and
// lambda may vary by tensor as mergekit allows (per-layer lists, filters). Anything else
// (another method, slices, LoRA "model+adapter" names, an unknown key) is refused with an error
// naming it.

#include <string>

#include "gradfix/jobs/jobs.hpp"

namespace gradfix {

bool is_yaml_path(const std::string& path);
// Relative model paths are taken from the current directory, as mergekit takes them.
ModelMergeJob mergekit_job(const std::string& path);

}  // namespace gradfix
