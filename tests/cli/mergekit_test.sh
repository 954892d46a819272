#!/usr/bin/env bash
# mergekit merge configurations (issue 8): `gradfix merge --config MERGE.yml --out DIR` on the
# configurations in tests/fixtures/mergekit equals mergekit-yaml's output on the same models
# (linear, task_arithmetic with lambda, ties with per-model weights and densities, normalised or
# not), at 1 to 3 ranks with the same bytes at every rank count; keeps the tensors mergekit's
# architecture table leaves out (the Llama biases); carries config.json and writes a model card;
# and refuses what it does not read, naming it.
#   mergekit_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/mergekit
close=$repo/tests/support/close_tensors.py
same=$repo/tests/support/same_tensors.py
work=$(mktemp -d /tmp/gradfix-mergekit-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$fixtures"  # the configurations name the models relative to their directory, as mergekit runs them

for config in linear task_arithmetic ties ties_unnormalized; do
  for ranks in 1 2 3; do
    mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" merge --config "$config.yml" --out "$work/$config-p$ranks" --chunk-elements 500 >/dev/null
    check "$config at P=$ranks equals mergekit's output" "$close" "$work/$config-p$ranks" "reference/$config" --reference-names
  done
  check "$config: the same bytes at 1, 2 and 3 ranks" bash -c "'$same' '$work/$config-p1' '$work/$config-p2' && '$same' '$work/$config-p1' '$work/$config-p3'"
done
check "the comparison can fail: ties is not task arithmetic" bash -c "! '$close' '$work/ties-p1' reference/task_arithmetic --reference-names 2>/dev/null"
check "the Llama biases mergekit leaves out are kept" bash -c "'$gradfix' inspect '$work/ties-p1' | grep -q '^model.layers.0.self_attn.q_proj.bias '"
check "config.json is carried from the base" test -f "$work/ties-p1/config.json"
check "the model card names the method and the variant" bash -c "grep -q '| method | ties |' '$work/ties-p1/README.md' && grep -q '| variant | mergekit |' '$work/ties-p1/README.md'"
check "the metadata keeps the configuration" bash -c "'$gradfix' inspect '$work/ties-p1' | grep -q '^metadata gradfix.merge_config = .*\"density\":0.3'"

# What gradfix does not read is refused, naming it; nothing is written.
bad() {  # bad NAME DESCRIPTION PATTERN YAML
  printf '%s\n' "$4" >"$work/$1.yml"
  expect_exit2 "$2" "$3" "$gradfix" merge --config "$work/$1.yml" --out "$work/$1-out"
  check "$2: nothing written" test ! -e "$work/$1-out"
}
bad slerp "another method" "merge_method 'slerp' is not one gradfix has" $'merge_method: slerp\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1}'
bad unknown "an unknown key" "does not read 'slices'" $'merge_method: ties\nslices: []\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1}'
bad layers "per-layer weights" "per-layer values" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: [0, 1]}'
bad lora "MODEL+LORA" "MODEL+LORA form is not read" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0+adapter\n    parameters: {weight: 1}'
bad weight "a missing weight" "weight is missing" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0'
bad alias "a YAML alias" "does not expand YAML aliases" $'merge_method: ties\nbase_model: &b base\nmodels:\n  - model: *b\n    parameters: {weight: 1}'
bad syntax "broken YAML" "line 2" $'merge_method: ties\n  models: [a\n'
bad tokenizer "another tokenizer source" "tokenizer_source: base" $'merge_method: ties\nbase_model: base\ntokenizer_source: union\nmodels:\n  - model: ft0\n    parameters: {weight: 1}'
expect_exit2 "a YAML config given to another subcommand" "only gradfix merge reads" "$gradfix" convert --config ties.yml base "$work/c.safetensors"
expect_exit2 "--task-vector beside a YAML config" "do not go with it" "$gradfix" merge --config ties.yml --task-vector ft0 --out "$work/x"
finish
