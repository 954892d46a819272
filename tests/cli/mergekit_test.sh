#!/usr/bin/env bash
# mergekit merge configurations (issue 8): `gradfix merge --config MERGE.yml --out DIR` on the
# configurations in tests/fixtures/mergekit equals mergekit-yaml's output on the same models
# (linear, task_arithmetic with lambda, ties with per-model weights and densities, normalised or
# not, rescaled, with top-level defaults of weight and density; breadcrumbs and breadcrumbs_ties;
# slerp; nuslerp with and without a base, by tensor, row or column; model_stock by tensor or row),
# at 1 to 3 ranks with the same bytes at every rank count; DARE (dare_ties, dare_linear)
# independent of the rank count, equal to task arithmetic at density 1, keeping the density's
# fraction of entries and each tensor's L1 norm; keeps the tensors mergekit's
# architecture table leaves out (the Llama biases); carries config.json and writes a model card;
# and refuses what it does not read, naming it.
#   mergekit_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/mergekit
export PYTHONPATH=$repo/tests/support${PYTHONPATH:+:$PYTHONPATH}  # safetensors_files for the checks below
close=$repo/tests/support/close_tensors.py
same=$repo/tests/support/same_tensors.py
work=$(mktemp -d /tmp/gradfix-mergekit-XXXXXX)
trap 'rm -rf "$work"' EXIT
expect_output=$work/out.txt  # not in the source tree
cd "$fixtures"  # the configurations name the models relative to their directory, as mergekit runs them

for config in linear task_arithmetic ties ties_unnormalized ties_rescale ties_defaults breadcrumbs breadcrumbs_ties slerp nuslerp nuslerp_nobase \
  nearswap model_stock multislerp multislerp_nobase sce sce_all karcher karcher_base ties_gradient slerp_gradient task_arithmetic_filters \
  passthrough_bf16 passthrough_scale ram ramplus_tl nuslerp_rows nuslerp_columns nuslerp_rows_nobase nuslerp_columns_nobase nuslerp_zero_sum \
  model_stock_rows passthrough_stack passthrough_repeat slerp_slices slerp_slice_t ties_slices vocab_base vocab_union vocab_model \
  vocab_slerp_union vocab_force vocab_model_token vocab_pad chat_chatml chat_literal gpt2_stack task_arithmetic_bf16 task_arithmetic_f16 ties_bf16; do
  for ranks in 1 2 3; do
    mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" merge --config "$config.yml" --out "$work/$config-p$ranks" --chunk-elements 500 >/dev/null
    # 16-bit merges: both round the inputs to the dtype; linear then computes in float32 and
    # rounds once, the delta merges round every operation, in both tools: mergekit's bytes.
    tolerance=()
    if grep -qE '^dtype: (bfloat16|float16)' "$config.yml"; then tolerance=(--abs 0 --rel 0); fi
    check "$config at P=$ranks equals mergekit's output" "$close" "$work/$config-p$ranks" "reference/$config" --reference-names "${tolerance[@]}"
  done
  check "$config: the same bytes at 1, 2 and 3 ranks" bash -c "'$same' '$work/$config-p1' '$work/$config-p2' && '$same' '$work/$config-p1' '$work/$config-p3'"
done
check "nearswap: mergekit's bytes exactly (the same float32 operations)" "$close" "$work/nearswap-p1" reference/nearswap --reference-names --abs 0 --rel 0
# The delta merges round each float32 operation as mergekit computes them (linear's products
# fused into its sum): mergekit's bytes; ties_rescale's L1 norms are sums in an order torch does
# not fix, so it stays within the tolerance above.
for config in linear task_arithmetic ties ties_unnormalized ties_defaults breadcrumbs breadcrumbs_ties task_arithmetic_filters ties_gradient \
  passthrough_scale; do
  check "$config: mergekit's bytes exactly (each float32 operation rounded in the same order)" \
    "$close" "$work/$config-p1" "reference/$config" --reference-names --abs 0 --rel 0
done
check "the comparison can fail: sce's selection of half the entries matters" bash -c "! '$close' '$work/sce-p1' reference/sce_all --reference-names 2>/dev/null"
# gradfix: {arithmetic: double} computes a 16-bit merge in double and rounds once: not mergekit's bytes.
for config in task_arithmetic_bf16 ties_bf16; do
  printf 'gradfix: {arithmetic: double}\n' | cat $config.yml - >"$work/${config}_f32.yml"
  "$gradfix" merge --config "$work/${config}_f32.yml" --out "$work/${config}_f32" >/dev/null
  check "the comparison can fail: $config computed in double and rounded once is not mergekit's bytes" \
    bash -c "! '$close' '$work/${config}_f32' reference/$config --reference-names --abs 0 --rel 0 >/dev/null 2>&1"
done
# (TIES's elected signs can flip where the sum of the deltas is near 0, so only task arithmetic
# stays within bfloat16's rounding.)
check "task_arithmetic_bf16 computed in double stays within bfloat16's rounding of mergekit's" \
  "$close" "$work/task_arithmetic_bf16_f32" reference/task_arithmetic_bf16 --reference-names --abs 0.004 --rel 0.008
printf 'gradfix: {arithmetic: bfloat16}\n' | cat task_arithmetic_bf16.yml - >"$work/arithmetic_bad.yml"
expect_exit2 "gradfix.arithmetic takes dtype or double" "gradfix.arithmetic 'bfloat16': valid: dtype" "$gradfix" merge --config "$work/arithmetic_bad.yml" --out "$work/arithmetic_bad"
# gradfix: {inputs: stored} reads the inputs at their stored precision instead of rounding them to dtype first.
printf 'gradfix: {inputs: stored}\n' | cat chat_chatml.yml - >"$work/chat_stored.yml"
"$gradfix" merge --config "$work/chat_stored.yml" --out "$work/chat_stored" >/dev/null
check "the comparison can fail: inputs at their stored precision are not mergekit's bfloat16 inputs" \
  bash -c "! '$close' '$work/chat_stored' reference/chat_chatml --reference-names --abs 0 --rel 0 >/dev/null 2>&1"
check "inputs at their stored precision stay within bfloat16's rounding of them" "$close" "$work/chat_stored" reference/chat_chatml --reference-names --abs 0.004 --rel 0.008
# Vocabularies: the output's tokens, ids and vocab_size equal mergekit's; the chat template is written.
for config in vocab_base vocab_union vocab_model vocab_slerp_union vocab_force vocab_model_token vocab_pad; do
  check "$config: mergekit's vocabulary and vocab_size" python3 "$repo/tests/support/vocabulary.py" "$work/$config-p2" "reference/$config"
done
check "chat_template chatml is written as chat_template.jinja" python3 "$repo/tests/support/vocabulary.py" "$work/chat_chatml-p1" reference/chat_chatml --template '<|im_start|>'
check "a literal chat_template is written as it is" bash -c "[ \"\$(cat '$work/chat_literal-p3/chat_template.jinja')\" = \"{{messages[0]['content']}}\" ]"
check "the comparison can fail: forced tokens take the named model's rows" bash -c "! '$close' '$work/vocab_force-p1' reference/vocab_union --reference-names 2>/dev/null"
check "the comparison can fail: model_token sources replace rows" bash -c "! '$close' '$work/vocab_model_token-p1' reference/vocab_base --reference-names 2>/dev/null"
check "the comparison can fail: the union is not the base's vocabulary" bash -c "! python3 '$repo/tests/support/vocabulary.py' '$work/vocab_union-p1' reference/vocab_base >/dev/null"
check "padding rows: 80 rows for 66 tokens" bash -c "'$gradfix' inspect '$work/vocab_pad-p1' | grep -q '^lm_head.weight  *F32  *.80, 16.'"
# Slices: the output's layer count in config.json; the slices form of a merge equals its models form.
check "a stack of 3 + 3 layers has 6 in config.json" bash -c "grep -q '\"num_hidden_layers\": 6' '$work/passthrough_stack-p1/config.json'"
check "a model's 5 layers twice have 10 in config.json, bfloat16" bash -c "grep -q '\"num_hidden_layers\": 10' '$work/passthrough_repeat-p2/config.json' && grep -q '\"dtype\": \"bfloat16\"' '$work/passthrough_repeat-p2/config.json'"
check "GPT-2's 3 layers twice have 6 in config.json's n_layer" bash -c "grep -q '\"n_layer\": 6' '$work/gpt2_stack-p3/config.json'"
check "slerp over one slice of every layer equals the models form (gradient-slerp.yml both ways)" "$close" "$work/slerp_slices-p1" reference/slerp_gradient --reference-names
check "the comparison can fail: a slice's own t matters" bash -c "! '$close' '$work/slerp_slice_t-p1' reference/slerp_slices --reference-names 2>/dev/null"
check "the metadata records each slice's sources" bash -c "'$gradfix' inspect '$work/ties_slices-p1' | grep -q '\"slices\":\[{\"base\":\"base\[0:2\]\",\"models\":\[\"ft0\[0:2\]\",\"ft1\[0:2\]\"\]}'"
# Row- and column-wise forms (a row is never split, a column's sums run through every rank).
check "the comparison can fail: nuslerp row by row is not nuslerp of whole tensors" bash -c "! '$close' '$work/nuslerp_rows-p1' reference/nuslerp --reference-names 2>/dev/null"
check "the comparison can fail: nuslerp column by column is not row by row" bash -c "! '$close' '$work/nuslerp_columns-p1' reference/nuslerp_rows --reference-names 2>/dev/null"
check "the comparison can fail: weights that sum to zero interpolate half-way" bash -c "! '$close' '$work/nuslerp_zero_sum-p1' reference/nuslerp_rows --reference-names 2>/dev/null"
check "the comparison can fail: model_stock row by row is not by tensor" bash -c "! '$close' '$work/model_stock_rows-p1' reference/model_stock --reference-names 2>/dev/null"
check "the comparison can fail: model_stock is not the models' mean" bash -c "! '$close' '$work/model_stock-p1' reference/linear --reference-names 2>/dev/null"
check "the comparison can fail: ties with rescale is not ties (it was ignored before)" bash -c "! '$close' '$work/ties_rescale-p1' reference/ties --reference-names 2>/dev/null"
for config in ram ramplus_tl; do
  check "$config: mergekit's bytes exactly (the same float32 operations)" "$close" "$work/$config-p1" "reference/$config" --reference-names --abs 0 --rel 0
done
check "the comparison can fail: RAM+ boosts what RAM keeps" bash -c "! '$close' '$work/ramplus_tl-p1' reference/ram --reference-names 2>/dev/null"
check "the comparison can fail: the scaled passthrough is not the model" bash -c "! '$close' '$work/passthrough_scale-p1' ft0 --reference-names 2>/dev/null"
sed 's/bfloat16/float32/' passthrough_bf16.yml >"$work/copy.yml"
"$gradfix" merge --config "$work/copy.yml" --out "$work/copy" >/dev/null
check "the plain passthrough in float32 is the model's bytes" "$same" "$work/copy" ft1
check "the comparison can fail: ties is not task arithmetic" bash -c "! '$close' '$work/ties-p1' reference/task_arithmetic --reference-names 2>/dev/null"
# Parameters that vary by layer and tensor name (the *_gradient and *_filters configurations on
# a five-layer model, equal to mergekit above): the same merge with one value everywhere differs.
sed 's/^    - value: 0.5$/    - value: 0.5/; /filter: self_attn/,/value: \[1, 0.5/d' slerp_gradient.yml >"$work/slerp_flat.yml"
check "the flat slerp has no filter left" bash -c "! grep -q filter '$work/slerp_flat.yml' && grep -q 'value: 0.5' '$work/slerp_flat.yml'"
"$gradfix" merge --config "$work/slerp_flat.yml" --out "$work/slerp_flat" >/dev/null
check "the comparison can fail: slerp with t = 0.5 everywhere is not slerp_gradient" \
  bash -c "! '$close' '$work/slerp_flat' reference/slerp_gradient --reference-names 2>/dev/null"
check "a varying parameter is named in the model card's options" \
  bash -c "'$gradfix' inspect '$work/ties_gradient-p1' | grep -q '\"per_tensor\":\\[\"density of .*ft0\",\"weight of .*ft1\",\"weight of .*ft2\"\\]'"
check "the Llama biases mergekit leaves out are kept" bash -c "'$gradfix' inspect '$work/ties-p1' | grep -q '^model.layers.0.self_attn.q_proj.bias '"
check "config.json is carried from the base" test -f "$work/ties-p1/config.json"
check "the model card names the method and the variant" bash -c "grep -q '| method | ties |' '$work/ties-p1/README.md' && grep -q '| variant | mergekit |' '$work/ties-p1/README.md'"
check "the metadata keeps the configuration" bash -c "'$gradfix' inspect '$work/ties-p1' | grep -q '^metadata gradfix.merge_config = .*\"density\":0.3'"

# DARE: draws from (seed, model, tensor, element), so the same bytes at every rank count; at
# density 1 dare_linear is task arithmetic (mergekit's output); with one model at density 0.3 the
# kept fraction is 0.3 and the rescaled delta keeps each tensor's L1 norm; another seed, other draws.
dare() {  # dare NAME METHOD DENSITY SEED [MODELS...]
  local name=$1 method=$2 density=$3 seed=$4
  shift 4
  {
    printf 'merge_method: %s\nbase_model: base\nmodels:\n' "$method"
    for model in "$@"; do printf '  - model: %s\n    parameters: {weight: %s, density: %s}\n' "${model%%:*}" "${model#*:}" "$density"; done
    printf 'parameters: {lambda: 0.7}\ndtype: float32\ngradfix: {seed: %s}\n' "$seed"
  } >"$work/$name.yml"
}
dare dense dare_linear 1.0 0 ft0:1.0 ft1:0.5 ft2:0.8
"$gradfix" merge --config "$work/dense.yml" --out "$work/dense" >/dev/null
check "dare_linear at density 1 equals mergekit's task arithmetic" "$close" "$work/dense" reference/task_arithmetic --reference-names
dare sparse dare_ties 0.4 7 ft0:1.0 ft1:0.5 ft2:0.8
for ranks in 1 2 3; do
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" merge --config "$work/sparse.yml" --out "$work/sparse-p$ranks" --chunk-elements 300 >/dev/null
done
check "dare_ties: the same bytes at 1, 2 and 3 ranks" bash -c "'$same' '$work/sparse-p1' '$work/sparse-p2' && '$same' '$work/sparse-p1' '$work/sparse-p3'"
dare other dare_ties 0.4 8 ft0:1.0 ft1:0.5 ft2:0.8
"$gradfix" merge --config "$work/other.yml" --out "$work/other" >/dev/null
check "dare_ties: another seed draws otherwise" bash -c "! '$same' '$work/sparse-p1' '$work/other'"
dare single dare_linear 0.3 3 ft0:1.0
sed -i 's/lambda: 0.7/lambda: 1.0/' "$work/single.yml"
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" merge --config "$work/single.yml" --out "$work/single.safetensors" >/dev/null
check "dare_linear: kept fraction 0.3 and each tensor's L1 norm kept" python3 - "$work/single.safetensors" base ft0 <<'PY'
import sys
from safetensors_files import f32
def load(path):
    return {key: values for key, (shape, values) in f32(path).items()}
merged, base, tuned = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
kept = total = 0
for key in base:
    before = [t - b for t, b in zip(tuned[key], base[key])]
    after = [m - b for m, b in zip(merged[key], base[key])]
    total += sum(1 for x in before if x != 0)
    kept += sum(1 for x in after if x != 0)
    l1_before, l1_after = sum(map(abs, before)), sum(map(abs, after))
    if l1_before > 1e-3 and abs(l1_after - l1_before) > 1e-4 * l1_before:
        sys.exit("%s: L1 %g after, %g before" % (key, l1_after, l1_before))
fraction = kept / total
print("dare_linear: kept %.4f of %d entries" % (fraction, total))
sys.exit(0 if abs(fraction - 0.3) < 0.015 else 1)
PY

# DELLA (MAGPRUNE): the DARE draws with a keep probability that rises with the entry's magnitude
# rank in its row, density - epsilon to density + epsilon. At density 1 della_linear is task
# arithmetic (mergekit's output); the same bytes at 1-3 ranks with chunks that cut rows; with one
# model at density 0.5 and epsilon 0.2, half the entries kept, the top half of each row's ranks
# at 0.6 and the bottom half at 0.4, each tensor's L1 norm kept; another seed, other draws.
della() {  # della NAME METHOD DENSITY EPSILON SEED [MODELS...]
  local name=$1 method=$2 density=$3 epsilon=$4 seed=$5
  shift 5
  {
    printf 'merge_method: %s\nbase_model: base\nmodels:\n' "$method"
    for model in "$@"; do printf '  - model: %s\n    parameters: {weight: %s, density: %s}\n' "${model%%:*}" "${model#*:}" "$density"; done
    printf 'parameters: {lambda: 0.7, epsilon: %s}\ndtype: float32\ngradfix: {seed: %s}\n' "$epsilon" "$seed"
  } >"$work/$name.yml"
}
della della_dense della_linear 1.0 0.1 0 ft0:1.0 ft1:0.5 ft2:0.8
"$gradfix" merge --config "$work/della_dense.yml" --out "$work/della_dense" >/dev/null
check "della_linear at density 1 equals mergekit's task arithmetic" "$close" "$work/della_dense" reference/task_arithmetic --reference-names
della della_sparse della 0.4 0.1 7 ft0:1.0 ft1:0.5 ft2:0.8
for ranks in 1 2 3; do
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" merge --config "$work/della_sparse.yml" --out "$work/della_sparse-p$ranks" --chunk-elements 300 >/dev/null
done
check "della: the same bytes at 1, 2 and 3 ranks" bash -c "'$same' '$work/della_sparse-p1' '$work/della_sparse-p2' && '$same' '$work/della_sparse-p1' '$work/della_sparse-p3'"
check "the comparison can fail: della is not dare_ties at the same seed" bash -c "! '$same' '$work/della_sparse-p1' '$work/sparse-p1'"
della della_other della 0.4 0.1 8 ft0:1.0 ft1:0.5 ft2:0.8
"$gradfix" merge --config "$work/della_other.yml" --out "$work/della_other" >/dev/null
check "della: another seed draws otherwise" bash -c "! '$same' '$work/della_sparse-p1' '$work/della_other'"
della della_single della_linear 0.5 0.2 3 ft0:1.0
sed -i 's/lambda: 0.7/lambda: 1.0/' "$work/della_single.yml"
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" merge --config "$work/della_single.yml" --out "$work/della_single.safetensors" --chunk-elements 300 >/dev/null
check "della_linear: kept 0.5, ranks in each row's top half 0.6 and bottom half 0.4, each tensor's L1 norm kept" \
  python3 - "$work/della_single.safetensors" base ft0 <<'PY'
import sys
from safetensors_files import f32 as load
merged, base, tuned = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
counts = {"top": [0, 0], "bottom": [0, 0]}
for key, (shape, values) in base.items():
    before = [t - b for t, b in zip(tuned[key][1], values)]
    after = [m - b for m, b in zip(merged[key][1], values)]
    width = shape[1] if len(shape) == 2 else len(values)
    for row in range(len(values) // width):
        entries = list(range(row * width, (row + 1) * width))
        ranked = sorted(entries, key=lambda i: abs(before[i]))
        for rank, i in enumerate(ranked):
            half = "top" if rank >= width / 2 else "bottom"
            counts[half][0] += after[i] != 0
            counts[half][1] += 1
    l1_before, l1_after = sum(map(abs, before)), sum(map(abs, after))
    if l1_before > 1e-3 and abs(l1_after - l1_before) > 1e-4 * l1_before:
        sys.exit("%s: L1 %g after, %g before" % (key, l1_after, l1_before))
top, bottom = counts["top"][0] / counts["top"][1], counts["bottom"][0] / counts["bottom"][1]
total = (counts["top"][0] + counts["bottom"][0]) / (counts["top"][1] + counts["bottom"][1])
print("della_linear: kept %.4f (top half %.4f, bottom half %.4f)" % (total, top, bottom))
sys.exit(0 if abs(total - 0.5) < 0.02 and abs(top - 0.6) < 0.03 and abs(bottom - 0.4) < 0.03 else 1)
PY

# Arcee Fusion: mergekit's float32 KL divergence of two nearly equal rows is off by about 1e-4
# relative (a difference of larger terms), gradfix's float64 one is not, so an entry whose
# importance is that close to the threshold may fall on the other side: every entry equals
# mergekit's, but for at most 5 of the 22,112, and those are the base's value in one and the
# model's in the other. The same bytes at 1-3 ranks, with chunks that cut rows.
for ranks in 1 2 3; do
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" merge --config arcee_fusion.yml --out "$work/arcee-p$ranks" --chunk-elements 300 >/dev/null
done
check "arcee_fusion: the same bytes at 1, 2 and 3 ranks" bash -c "'$same' '$work/arcee-p1' '$work/arcee-p2' && '$same' '$work/arcee-p1' '$work/arcee-p3'"
check "arcee_fusion equals mergekit's output but for at most 5 entries at the threshold" python3 - "$work/arcee-p1" reference/arcee_fusion base ft0 <<'PY'
import sys
from safetensors_files import f32
def load(path):
    return {key: values for key, (shape, values) in f32(path).items()}
ours, reference, base, model = (load(p) for p in sys.argv[1:5])
flips = kept = total = 0
for key, expected in reference.items():
    for o, r, a, b in zip(ours[key], expected, base[key], model[key]):
        total += 1
        kept += r != a
        if o == r:
            continue
        if abs(o - r) <= 1e-6 + 1e-5 * abs(r):
            continue
        if (o == a) != (r == a):
            flips += 1
        else:
            sys.exit("%s: %r against %r is not a fusion decision" % (key, o, r))
print("arcee_fusion: %d of %d entries kept from the model by mergekit; %d decided otherwise" % (kept, total, flips))
sys.exit(0 if flips <= 5 and kept > 0 else 1)
PY

# What gradfix does not read is refused, naming it; nothing is written.
bad() {  # bad NAME DESCRIPTION PATTERN YAML
  printf '%s\n' "$4" >"$work/$1.yml"
  expect_exit2 "$2" "$3" "$gradfix" merge --config "$work/$1.yml" --out "$work/$1-out"
  check "$2: nothing written" test ! -e "$work/$1-out"
}
bad seed "a bad seed" "gradfix.seed must be a non-negative integer" $'merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, density: 0.5}\ngradfix: {seed: -1}'
bad arcee_two "arcee_fusion of two models besides the base" "arcee_fusion fuses one model into the base; got 2" $'merge_method: arcee_fusion\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1'
bad unknown_method "another method" "merge_method 'frankenstein' is not one gradfix has" $'merge_method: frankenstein\nbase_model: base\nmodels:\n  - model: ft0'
bad della_epsilon "della's epsilon past density's room (mergekit's test_della_invalid_epsilon)" "della's epsilon 1.35 with density 0.66 for tensor .*: density ./- epsilon must lie in .0, 1." $'merge_method: della\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, density: 0.66}\nparameters: {epsilon: 1.35, lambda: 0.5}'
bad passthrough_two "passthrough of two models" "passthrough copies exactly one model .* got 2" $'merge_method: passthrough\nmodels:\n  - model: ft0\n  - model: ft1'
bad passthrough_base "passthrough with another base_model" "passthrough copies exactly one model .* got 2 with the base_model" $'merge_method: passthrough\nbase_model: base\nmodels:\n  - model: ft0'
bad passthrough_weight "a weight in passthrough" "parameters: gradfix does not read 'weight' .it reads scale." $'merge_method: passthrough\nmodels:\n  - model: ft0\n    parameters: {weight: 2}'
bad ties_scale "scale in a ties merge" "parameters.scale is a parameter of passthrough, not of ties" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, scale: 2}'
bad ram_r "r in a ram merge" "parameters.r is a parameter of ramplus_tl, not of ram" $'merge_method: ram\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\nparameters: {r: 0.5}'
bad ram_epsilon "a negative ram epsilon" "ram: epsilon must be a finite number >= 0" $'merge_method: ram\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\nparameters: {epsilon: -1}'
bad ties_epsilon "epsilon in a ties merge" "parameters.epsilon is a parameter of della and della_linear, not of ties" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, density: 0.5, epsilon: 0.1}'
bad slerp_t "slerp without t" "slerp needs parameters.t" $'merge_method: slerp\nbase_model: base\nmodels:\n  - model: ft0'
bad slerp_two "slerp of two models" "slerp interpolates between the base and one other model; got 2" $'merge_method: slerp\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\nparameters: {t: 0.5}'
bad nearswap_t "nearswap without t" "nearswap needs parameters.t" $'merge_method: nearswap\nbase_model: base\nmodels:\n  - model: ft0'
bad nearswap_two "nearswap of two models" "nearswap moves the base towards one other model; got 2" $'merge_method: nearswap\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\nparameters: {t: 0.01}'
bad nearswap_negative "a negative nearswap t" "nearswap: t must be a finite number >= 0, got -0.5" $'merge_method: nearswap\nbase_model: base\nmodels:\n  - model: ft0\nparameters: {t: -0.5}'
bad stock_one "model_stock of one model" "model_stock needs at least two models besides the base" $'merge_method: model_stock\nbase_model: base\nmodels:\n  - model: ft0'
bad nuslerp_row_text "a nuslerp_row_wise that is no boolean" "parameters.nuslerp_row_wise is \"yes\", not true or false" $'merge_method: nuslerp\nmodels:\n  - model: ft0\n    parameters: {weight: 1}\n  - model: ft1\n    parameters: {weight: 1}\nparameters: {nuslerp_flatten: false, nuslerp_row_wise: "yes"}'
bad stock_rows_text "a filter_wise that is no boolean" "parameters.filter_wise is 1, not true or false" $'merge_method: model_stock\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\nparameters: {filter_wise: 1}'
bad filter_wise_nuslerp "filter_wise in a nuslerp" "parameters.filter_wise is a parameter of model_stock, not of nuslerp" $'merge_method: nuslerp\nmodels:\n  - model: ft0\n    parameters: {weight: 1}\n  - model: ft1\n    parameters: {weight: 1}\nparameters: {filter_wise: true}'
bad stock_order "a gradient-sign mask on model_stock" "model_stock merges whole weights .or interpolates them." $'merge_method: model_stock\nbase_model: base\nmodels:\n  - model: ft0\n    gradfix: {signs: ft0}\n  - model: ft1\n    gradfix: {signs: ft1}\ngradfix: {order: merge-then-mask}'
bad multislerp_eps "a negative multislerp eps" "multislerp: eps must be a finite number >= 0, got -1" $'merge_method: multislerp\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1}\n  - model: ft1\n    parameters: {weight: 1}\nparameters: {eps: -1}'
bad ties_normalize_weights "normalize_weights in a ties merge" "parameters.normalize_weights is a parameter of multislerp, not of ties" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, density: 0.5}\nparameters: {normalize_weights: true}'
bad sce_topk "an sce select_topk above 1" "sce: select_topk must be in .0, 1., got 1.5" $'merge_method: sce\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\nparameters: {select_topk: 1.5}'
bad karcher_iterations "a fractional karcher max_iter" "parameters.max_iter is 2.5, not a whole number" $'merge_method: karcher\nmodels:\n  - model: ft0\n  - model: ft1\nparameters: {max_iter: 2.5}'
bad ties_t "a parameter of another method" "parameters.t is a parameter of slerp and nearswap, not of ties" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, density: 0.5}\nparameters: {t: 0.5}'
bad ties_gamma "gamma in a ties merge" "parameters.gamma is a parameter of breadcrumbs and breadcrumbs_ties, not of ties" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, density: 0.5, gamma: 0.1}'
bad nuslerp_lambda "lambda in a nuslerp" "parameters.lambda is a parameter of linear, task_arithmetic, ties, dare_., breadcrumbs., della., not of nuslerp" $'merge_method: nuslerp\nmodels:\n  - model: ft0\n    parameters: {weight: 1}\n  - model: ft1\n    parameters: {weight: 1}\nparameters: {lambda: 2}'
bad unknown "an unknown key" "does not read 'modules'" $'merge_method: ties\nmodules: {}\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1}'
# A weight given to a method that takes none (mergekit's tests give every model one): ignored, as
# mergekit ignores it, and said so; the result is the merge without it.
for method in model_stock sce ram; do
  printf 'merge_method: %s\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 0.6}\n  - model: ft1\n    parameters: {weight: 0.4}\n  - model: ft2\ndtype: float32\n' \
    "$method" >"$work/${method}_weights.yml"
  "$gradfix" merge --config "$work/${method}_weights.yml" --out "$work/${method}_weights" >"$work/${method}_weights.txt"
  check "$method: a model's weight is ignored and said so" grep -q "models.0..parameters.weight is ignored: $method takes no weights" "$work/${method}_weights.txt"
done
check "model_stock with ignored weights equals mergekit's model_stock" "$close" "$work/model_stock_weights" reference/model_stock --reference-names
check "sce with ignored weights equals mergekit's sce" "$close" "$work/sce_weights" reference/sce_all --reference-names
check "ram with ignored weights equals mergekit's ram" "$close" "$work/ram_weights" reference/ram --reference-names
sed 's#^      - model: layered/ft0$#      - model: layered/ft0\n        parameters: {weight: 0.7}#' slerp_slice_t.yml >"$work/slice_weights.yml"
"$gradfix" merge --config "$work/slice_weights.yml" --out "$work/slice_weights" >"$work/slice_weights.txt"
check "a weight in a later slice of a slerp is ignored and said so" \
  grep -q "slices.1..sources.1..parameters.weight is ignored: slerp takes no weights" "$work/slice_weights.txt"
check "the slerp with ignored slice weights equals mergekit's" "$close" "$work/slice_weights" reference/slerp_slice_t --reference-names
# Vocabularies: what mergekit refuses, and what gradfix does not take, named.
two=$'merge_method: linear\nbase_model: vocab/base\nmodels:\n  - model: vocab/base\n    parameters: {weight: 1}\n  - model: vocab/chatml\n    parameters: {weight: 1}'
bad vocab_mismatch "vocabularies of different sizes without a tokenizer source (mergekit 0.1.5 refuses it too)" \
  "tensor 'lm_head.weight' has 64 rows in vocab/base.* and 66 in vocab/chatml.*: the vocabularies differ. Align them with tokenizer_source" "$two"
bad inputs_other "another gradfix.inputs" "gradfix.inputs 'float32': valid: dtype, stored" "$two"$'\ngradfix: {inputs: float32}'
bad vocab_both "tokenizer_source and a tokenizer section" "tokenizer_source and tokenizer are both given" "$two"$'\ntokenizer_source: union\ntokenizer: {source: base}'
bad vocab_no_tokenizer "a base without tokenizer.json" "layered/base: no tokenizer.json" \
  $'merge_method: linear\nbase_model: layered/base\nmodels:\n  - model: layered/base\n    parameters: {weight: 1}\n  - model: layered/ft0\n    parameters: {weight: 1}\ntokenizer_source: union'
bad vocab_outsider "a token source outside the merge" "tokenizer.tokens._tok_5: model .*vocab/padded is not one of the merge's models" \
  "$two"$'\ntokenizer:\n  tokens:\n    _tok_5: {source: vocab/padded, force: true}'
bad vocab_token_id "a model_token id past the model's rows" "token id 70 is outside .*vocab/chatml's 66 rows" \
  "$two"$'\ntokenizer:\n  tokens:\n    _tok_5:\n      source: {kind: model_token, model: vocab/chatml, token_id: 70}'
bad vocab_both_ids "a model_token with token_id and token" "needs one of token_id and token" \
  "$two"$'\ntokenizer:\n  tokens:\n    _tok_5:\n      source: {kind: model_token, model: vocab/chatml, token_id: 7, token: _tok_7}'
bad vocab_kind "an unknown token source kind" "source.kind 'mean': valid: model_token, zero" "$two"$'\ntokenizer:\n  tokens:\n    _tok_5:\n      source: {kind: mean}'
bad vocab_pad "pad_to_multiple_of 0" "pad_to_multiple_of is 0, not a whole number from 1" "$two"$'\ntokenizer: {source: base, pad_to_multiple_of: 0}'
bad vocab_slices "a tokenizer source with slices" "a tokenizer source with slices is not implemented" \
  $'merge_method: passthrough\nslices:\n  - sources:\n      - model: vocab/chatml\n        layer_range: [0, 2]\ntokenizer_source: base'
bad chat_unknown "an unknown chat template name" "chat_template 'vicuna' is neither a template nor a name gradfix knows .alpaca, chatml, exaone, llama3, mistral, auto." \
  "$two"$'\ntokenizer_source: union\nchat_template: vicuna'
# Slices: what mergekit refuses, and what gradfix does not take, named.
slice=$'  - sources:\n      - model: layered/base\n        layer_range: [0, 2]\n      - model: layered/ft0\n        layer_range: [0, 2]\n        parameters: {weight: 1}'
bad slices_and_models "both models and slices" "models and slices are both given" $'merge_method: ties\nbase_model: layered/base\nmodels:\n  - model: layered/ft0\n    parameters: {weight: 1}\nslices:\n'"$slice"
bad slices_empty "an empty slices list" "slices must be a non-empty list" $'merge_method: ties\nbase_model: layered/base\nslices: []'
bad slice_lengths "sources of different lengths (mergekit's own error)" "slices.0.: .*ft0 takes 3 layers and .*base 2 .mergekit: \"All inputs to a slice must contain the same number of layers" \
  $'merge_method: ties\nbase_model: layered/base\nslices:\n  - sources:\n      - model: layered/base\n        layer_range: [0, 2]\n      - model: layered/ft0\n        layer_range: [0, 3]\n        parameters: {weight: 1}'
bad slice_past "a layer_range past the model's layers" "layered/ft0.*: slices.0. takes layer_range .3, 6. of a model with 5 layers" \
  $'merge_method: passthrough\nslices:\n  - sources:\n      - model: layered/ft0\n        layer_range: [3, 6]'
bad slice_backwards "a layer_range that is no range" "layer_range .3, 1. is not a range of layers" \
  $'merge_method: passthrough\nslices:\n  - sources:\n      - model: layered/ft0\n        layer_range: [3, 1]'
bad slice_no_range "a source without a layer_range" "slices.0..sources.0. needs a layer_range .begin, end." \
  $'merge_method: passthrough\nslices:\n  - sources:\n      - model: layered/ft0'
bad slice_no_base "a ties slice without the base's layers" "slices.1. has no source from the base_model .*layered/base" \
  $'merge_method: ties\nbase_model: layered/base\nslices:\n'"$slice"$'\n  - sources:\n      - model: layered/ft0\n        layer_range: [2, 5]\n        parameters: {weight: 1}'
bad slice_counts "slices that merge different numbers of models" "slices.1. merges 2 model.s. besides the base, slices.0. 1" \
  $'merge_method: ties\nbase_model: layered/base\nslices:\n'"$slice"$'\n  - sources:\n      - model: layered/base\n        layer_range: [2, 5]\n      - model: layered/ft0\n        layer_range: [2, 5]\n        parameters: {weight: 1}\n      - model: layered/ft1\n        layer_range: [2, 5]\n        parameters: {weight: 1}'
bad slice_base "a slice with another base_model" "slices.0..base_model differs from the top-level base_model" \
  $'merge_method: ties\nbase_model: layered/base\nslices:\n'"$slice"$'\n    base_model: layered/ft1'
bad slice_parameter "a slice parameter gradfix does not take per slice" "slices.0..parameters: gradfix does not read 'normalize'" \
  $'merge_method: ties\nbase_model: layered/base\nslices:\n'"$slice"$'\n    parameters: {normalize: false}'
bad slice_gamma "a slice's gamma in a ties merge" "slices.0..parameters.gamma is a parameter of breadcrumbs and breadcrumbs_ties, not of ties" \
  $'merge_method: ties\nbase_model: layered/base\nslices:\n'"$slice"$'\n    parameters: {gamma: 0.1}'
bad slice_masks "gradient-sign masks with slices" "gradfix.order with slices" \
  $'merge_method: ties\nbase_model: layered/base\nslices:\n'"$slice"$'\ngradfix: {order: mask-then-merge}'
bad slice_residual "a slice's residual_weight" "slices.0.: gradfix does not read 'residual_weight'" \
  $'merge_method: passthrough\nslices:\n  - sources:\n      - model: layered/ft0\n        layer_range: [0, 2]\n    residual_weight: 0.5'
bad layers "a per-layer list of a parameter that takes one number" "parameters.select_topk: gradfix takes one number here" $'merge_method: sce\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\nparameters: {select_topk: [0.5, 1]}'
bad empty_list "an empty per-layer list" "weight is \\[\\]: a parameter is a number, a list of numbers" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: []}'
bad mixed_list "a list of numbers and conditions" "weight is \\[0.5,{\"value\":1}\\]: a parameter is" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters:\n      weight: [0.5, {value: 1}]'
bad no_match "a filtered weight that no tensor's fallback covers" "ft0: weight has no value for tensor model.embed_tokens.weight .no filter matches it" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters:\n      weight: [{filter: mlp, value: 1}]'
bad filter_type "a filter that is not text" "weight.0..filter is 3, not text" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters:\n      weight: [{filter: 3, value: 1}]'
bad condition_key "a condition with another key" "gradfix does not read 'when'" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters:\n      weight: [{when: mlp, value: 1}]'
bad density_range "a per-layer density above 1" "ft0: density for tensor model.embed_tokens.weight must be in .0, 1., got 1.5" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, density: [1.5, 0.5]}'
bad linear_density "a per-layer density in a merge that does not sparsify" "density: linear does not sparsify" $'merge_method: linear\nmodels:\n  - model: ft0\n    parameters: {weight: 1, density: [0.5, 1]}'
bad lora "MODEL+LORA" "MODEL+LORA form is not read" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0+adapter\n    parameters: {weight: 1}'
bad weight "a missing weight" "weight is missing" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0'
bad alias "a YAML alias" "does not expand YAML aliases" $'merge_method: ties\nbase_model: &b base\nmodels:\n  - model: *b\n    parameters: {weight: 1}'
bad syntax "broken YAML" "line 2" $'merge_method: ties\n  models: [a\n'
bad linear_base "linear with a base_model that is not among the models (mergekit refuses it)" "base_model .*base is not among the models of this linear merge" $'merge_method: linear\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1}\n  - model: ft1\n    parameters: {weight: 1}'
HF_HUB_CACHE=$work/empty-cache bad hub "a hub name the local cache does not hold" "'someorg/Some-Model-7B' is no path here.*huggingface-cli download someorg/Some-Model-7B" $'merge_method: ties\nbase_model: base\nmodels:\n  - model: someorg/Some-Model-7B\n    parameters: {weight: 1}'
expect_exit2 "a YAML config given to another subcommand" "only gradfix merge reads" "$gradfix" convert --config ties.yml base "$work/c.safetensors"
expect_exit2 "--task-vector beside a YAML config" "do not go with it" "$gradfix" merge --config ties.yml --task-vector ft0 --out "$work/x"
finish
