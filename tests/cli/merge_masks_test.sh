#!/usr/bin/env bash
# Gradient-sign masks in whole-model merges (the `gradfix:` section of a mergekit configuration)
# and mergekit's TIES rules over task vectors (`gradfix merge --ties-variant mergekit`), on the
# tiny Llama and three fine-tunes of tests/fixtures/mergekit:
# - ties and task_arithmetic with mask-then-merge and merge-then-mask (normal mask) equal a
#   brute-force reference written from the definitions (tests/support/model_merge_reference.py),
#   at 1 to 3 ranks with the same bytes at every rank count;
# - a soft rowwise mask (which needs sums over rows) equals the same masking done over task
#   vectors (taskvector, merge --order mask-then-merge, apply); merge-then-mask with soft1 and
#   dare_ties with masks give the same bytes at every rank count;
# - --ties-variant mergekit over task vectors, applied to the base, equals the whole-model merge
#   of the same models (itself equal to mergekit-yaml's output, tests/cli/mergekit_test.sh);
# - what does not fit is refused, naming it.
#   merge_masks_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
reference=$repo/tests/support/model_merge_reference.py
close=$repo/tests/support/close_tensors.py
same=$repo/tests/support/same_tensors.py
work=$(mktemp -d /tmp/gradfix-merge-masks-XXXXXX)
trap 'rm -rf "$work"' EXIT
expect_output=$work/out.txt
cd "$repo/tests/fixtures/mergekit"  # model paths are relative to the current directory, as mergekit takes them

# Sign statistics on the base: any tensors of its shapes with both signs and some zeros; here
# differences between the other fine-tunes.
"$gradfix" taskvector --base ft1 --finetuned ft2 --out "$work/s0.safetensors" >/dev/null
"$gradfix" taskvector --base ft2 --finetuned ft0 --out "$work/s1.safetensors" >/dev/null
"$gradfix" taskvector --base ft0 --finetuned ft1 --out "$work/s2.safetensors" >/dev/null

config() {  # config NAME METHOD ORDER MODE LAMBDA NORMALIZE MODEL:WEIGHT:DENSITY...
  local name=$1 method=$2 order=$3 mode=$4 lambda=$5 normalize=$6 m=0
  shift 6
  {
    printf 'merge_method: %s\nbase_model: base\nmodels:\n' "$method"
    for spec in "$@"; do
      IFS=: read -r model weight density <<<"$spec"
      printf '  - model: %s\n    parameters: {weight: %s, density: %s}\n    gradfix: {signs: %s}\n' "$model" "$weight" "$density" "$work/s$m.safetensors"
      m=$((m + 1))
    done
    printf 'parameters: {lambda: %s, normalize: %s}\ndtype: float32\ngradfix: {order: %s, mask_mode: %s, seed: 5}\n' "$lambda" "$normalize" "$order" "$mode"
  } >"$work/$name.yml"
}
models=(ft0:1.0:0.5 ft1:0.5:0.7 ft2:0.8:0.3)
specs=("ft0:1.0:0.5:$work/s0.safetensors" "ft1:0.5:0.7:$work/s1.safetensors" "ft2:0.8:0.3:$work/s2.safetensors")
for order in mask-then-merge merge-then-mask; do
  config "ties-$order" ties "$order" normal 0.9 true "${models[@]}"
  for ranks in 1 2 3; do
    mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" merge --config "$work/ties-$order.yml" --out "$work/ties-$order-p$ranks" \
      --chunk-elements 300 --quiet >/dev/null
  done
  args=(--base base --method ties --lambda 0.9 --normalize 1 --order "$order")
  for spec in "${specs[@]}"; do args+=(--model "$spec"); done
  check "ties, $order: equals the reference" python3 "$reference" "$work/ties-$order-p1" "${args[@]}"
  check "ties, $order: the same bytes at 1, 2 and 3 ranks" \
    bash -c "'$same' '$work/ties-$order-p1' '$work/ties-$order-p2' && '$same' '$work/ties-$order-p1' '$work/ties-$order-p3'"
  config "ta-$order" task_arithmetic "$order" normal 0.6 false ft0:1.0:1 ft1:0.5:1 ft2:0.8:1
  mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" merge --config "$work/ta-$order.yml" --out "$work/ta-$order" --quiet >/dev/null
  args=(--base base --method task_arithmetic --lambda 0.6 --normalize 0 --order "$order")
  for spec in ft0:1.0:1:"$work/s0.safetensors" ft1:0.5:1:"$work/s1.safetensors" ft2:0.8:1:"$work/s2.safetensors"; do args+=(--model "$spec"); done
  check "task_arithmetic, $order: equals the reference" python3 "$reference" "$work/ta-$order" "${args[@]}"
done
config ties-none ties none normal 0.9 true "${models[@]}"
sed -i '/gradfix: {signs/d; s/order: none, //' "$work/ties-none.yml"
"$gradfix" merge --config "$work/ties-none.yml" --out "$work/ties-none" --quiet >/dev/null
check "the reference can fail: the masked merge is not the plain one" \
  bash -c "! python3 '$reference' '$work/ties-none' --base base --method ties --lambda 0.9 --order mask-then-merge $(printf -- '--model %s ' "${specs[@]}") >/dev/null 2>&1"
check "the plain merge equals the reference without masks" python3 "$reference" "$work/ties-none" --base base --method ties --lambda 0.9 \
  --model ft0:1.0:0.5 --model ft1:0.5:0.7 --model ft2:0.8:0.3
check "the model card names the order and the signs" \
  bash -c "grep -q '| order | mask-then-merge |' '$work/ties-mask-then-merge-p1/README.md' && grep -q 's0.safetensors' '$work/ties-mask-then-merge-p1/README.md'"

# A soft rowwise mask (sums over rows, all-reduced where a tensor is split) equals the same masks
# over task vectors: base + 0.6 * sum_m masked(tau_m) with unit weights.
config ta-soft task_arithmetic mask-then-merge soft1_rowwise 0.6 false ft0:1:1 ft1:1:1 ft2:1:1
mpirun "${mpirun_flags[@]}" -np 3 "$gradfix" merge --config "$work/ta-soft.yml" --out "$work/ta-soft" --chunk-elements 200 --quiet >/dev/null
for m in 0 1 2; do "$gradfix" taskvector --base base --finetuned "ft$m" --out "$work/tau$m.safetensors" >/dev/null; done
"$gradfix" merge --method sum --order mask-then-merge --mask-mode soft1_rowwise --seed 5 \
  --task-vector "$work/tau0.safetensors" --task-vector "$work/tau1.safetensors" --task-vector "$work/tau2.safetensors" \
  --signs "$work/s0.safetensors" --signs "$work/s1.safetensors" --signs "$work/s2.safetensors" --out "$work/soft-sum.safetensors" >/dev/null
"$gradfix" apply --base base --task-vector "$work/soft-sum.safetensors" --alpha 0.6 --out "$work/soft-applied" >/dev/null
check "soft1_rowwise mask-then-merge equals the masks over task vectors" "$close" "$work/ta-soft" "$work/soft-applied"
config ties-soft ties merge-then-mask soft1 1.0 true "${models[@]}"
config dare-masked dare_ties mask-then-merge normal 1.0 false "${models[@]}"
for name in ties-soft dare-masked; do
  for ranks in 1 3; do
    mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" merge --config "$work/$name.yml" --out "$work/$name-p$ranks" --chunk-elements 300 --quiet >/dev/null
  done
  check "$name: the same bytes at 1 and 3 ranks" "$same" "$work/$name-p1" "$work/$name-p3"
done

# Mask-then-merge with the methods that do not sum deltas themselves (each model's delta from the
# base masked first): equal to the plain merge of models masked beforehand (each task vector
# masked alone with `merge --method sum`, applied to the base), at 1 and 2 ranks.
for m in 0 1 2; do
  "$gradfix" merge --method sum --order mask-then-merge --mask-mode normal --task-vector "$work/tau$m.safetensors" \
    --signs "$work/s$m.safetensors" --out "$work/masked-tau$m.safetensors" >/dev/null
  "$gradfix" apply --base base --task-vector "$work/masked-tau$m.safetensors" --alpha 1 --out "$work/masked-ft$m" >/dev/null
done
whole() {  # whole NAME METHOD PARAMETERS MODEL[:WEIGHT]...
  local name=$1 method=$2 parameters=$3 spec model weight
  shift 3
  for form in masked manual; do
    {
      printf 'merge_method: %s\nbase_model: base\nmodels:\n' "$method"
      for spec in "$@"; do
        IFS=: read -r model weight <<<"$spec"
        if [ "$form" = masked ]; then printf '  - model: ft%s\n' "$model"; else printf '  - model: %s\n' "$work/masked-ft$model"; fi
        if [ -n "$weight" ]; then printf '    parameters: {weight: %s}\n' "$weight"; fi
        if [ "$form" = masked ]; then printf '    gradfix: {signs: %s}\n' "$work/s$model.safetensors"; fi
      done
      if [ -n "$parameters" ]; then printf 'parameters: %s\n' "$parameters"; fi
      printf 'dtype: float32\n'
      if [ "$form" = masked ]; then printf 'gradfix: {order: mask-then-merge, mask_mode: normal}\n'; fi
    } >"$work/$name-$form.yml"
  done
  for ranks in 1 2; do
    mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" merge --config "$work/$name-masked.yml" --out "$work/$name-masked-p$ranks" \
      --chunk-elements 300 --quiet >/dev/null
  done
  "$gradfix" merge --config "$work/$name-manual.yml" --out "$work/$name-manual" --quiet >/dev/null
  check "$name, mask-then-merge: equals the merge of models masked first" "$close" "$work/$name-masked-p1" "$work/$name-manual"
  check "$name, mask-then-merge: the same bytes at 1 and 2 ranks" "$same" "$work/$name-masked-p1" "$work/$name-masked-p2"
}
whole slerp slerp '{t: 0.3}' 0
whole nuslerp nuslerp '' 0:0.4 1:0.6
whole nearswap nearswap '{t: 0.01}' 0
whole model_stock model_stock '' 0 1 2
whole multislerp multislerp '' 0:1.0 1:0.5 2:0.8
whole sce sce '' 0 1 2
whole ram ram '' 0 1 2
whole ramplus_tl ramplus_tl '{r: 0.3, alpha: 0.5}' 0 1 2
whole arcee_fusion arcee_fusion '' 0
sed -i 's#'"$work"'/masked-ft#ft#' "$work/model_stock-manual.yml"
"$gradfix" merge --config "$work/model_stock-manual.yml" --out "$work/model_stock-plain" --quiet >/dev/null
check "the comparison can fail: the masked model_stock is not the plain one" bash -c "! '$close' '$work/model_stock-masked-p1' '$work/model_stock-plain' >/dev/null 2>&1"

# mergekit's TIES over task vectors, applied to the base, is the whole-model merge with unit
# weights; gradfix's own TIES rules give another result.
printf 'merge_method: ties\nbase_model: base\nmodels:\n' >"$work/unit.yml"
for m in 0 1 2; do printf '  - model: ft%s\n    parameters: {weight: 1, density: 0.3}\n' "$m" >>"$work/unit.yml"; done
printf 'parameters: {lambda: 1.0}\ndtype: float32\n' >>"$work/unit.yml"
"$gradfix" merge --config "$work/unit.yml" --out "$work/unit" --quiet >/dev/null
taus=(--task-vector "$work/tau0.safetensors" --task-vector "$work/tau1.safetensors" --task-vector "$work/tau2.safetensors")
for ranks in 1 2 3; do
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" merge --method ties --ties-variant mergekit --ties-fraction 0.3 "${taus[@]}" \
    --chunk-elements 250 --out "$work/variant-p$ranks.safetensors" --quiet >/dev/null
done
check "--ties-variant mergekit: the same bytes at 1, 2 and 3 ranks" \
  bash -c "'$same' '$work/variant-p1.safetensors' '$work/variant-p2.safetensors' && '$same' '$work/variant-p1.safetensors' '$work/variant-p3.safetensors'"
"$gradfix" apply --base base --task-vector "$work/variant-p1.safetensors" --alpha 1 --out "$work/variant-applied" >/dev/null
check "--ties-variant mergekit applied equals mergekit's whole-model TIES" "$close" "$work/variant-applied" "$work/unit"
"$gradfix" merge --method ties --ties-fraction 0.3 "${taus[@]}" --out "$work/own.safetensors" --quiet >/dev/null
"$gradfix" apply --base base --task-vector "$work/own.safetensors" --alpha 1 --out "$work/own-applied" >/dev/null
check "gradfix's own TIES rules differ from mergekit's" bash -c "! '$close' '$work/own-applied' '$work/unit' >/dev/null 2>&1"
check "the variant is recorded" bash -c "'$gradfix' inspect '$work/variant-p1.safetensors' | grep -q '\"variant\":\"mergekit\"'"

# Refused, naming what does not fit; nothing written.
bad() {  # bad NAME DESCRIPTION PATTERN COMMAND...
  local name=$1 description=$2 pattern=$3
  shift 3
  expect_exit2 "$description" "$pattern" "$@"
  check "$description: nothing written" test ! -e "$work/$name-out"
}
config no-signs ties mask-then-merge normal 1 true "${models[@]}"
sed -i '0,/gradfix: {signs/{/gradfix: {signs/d}' "$work/no-signs.yml"
bad no-signs "a model without statistics" "ft0 has no gradfix: {signs: FILE}" "$gradfix" merge --config "$work/no-signs.yml" --out "$work/no-signs-out"
config no-order ties none normal 1 true "${models[@]}"
sed -i 's/order: none, //' "$work/no-order.yml"
bad no-order "statistics without an order" "gradfix.order is not set" "$gradfix" merge --config "$work/no-order.yml" --out "$work/no-order-out"
config linear linear mask-then-merge normal 1 true base:1:1 ft0:1:1 ft1:1:1  # a linear merge lists its base (mergekit)
bad linear "masks in a linear merge" "linear merges whole weights" "$gradfix" merge --config "$work/linear.yml" --out "$work/linear-out"
printf 'merge_method: karcher\nmodels:\n  - model: ft0\n    gradfix: {signs: %s}\n  - model: ft1\n    gradfix: {signs: %s}\ngradfix: {order: mask-then-merge}\n' \
  "$work/s0.safetensors" "$work/s1.safetensors" >"$work/karcher.yml"
bad karcher "masks in a karcher merge" "mask-then-merge: karcher without a base_model merges whole weights, not deltas from a base model" \
  "$gradfix" merge --config "$work/karcher.yml" --out "$work/karcher-out"
sed 's/mask-then-merge/merge-then-mask/' "$work/slerp-masked.yml" >"$work/slerp-after.yml"
bad slerp-after "merge-then-mask with slerp (no sum of deltas)" "slerp merges whole weights .or interpolates them.*mask-then-merge with every method that has a base" \
  "$gradfix" merge --config "$work/slerp-after.yml" --out "$work/slerp-after-out"
config mode ties mask-then-merge sharp 1 true "${models[@]}"
bad mode "an unknown mask mode" "gradfix.mask_mode: unknown mask mode 'sharp'" "$gradfix" merge --config "$work/mode.yml" --out "$work/mode-out"
config wrong ties merge-then-mask normal 1 true "${models[@]}"
"$gradfix" convert ft0 "$work/short.safetensors" --exclude 'model\.norm\.weight' >/dev/null
sed -i "s#$work/s1.safetensors#$work/short.safetensors#" "$work/wrong.yml"
bad wrong "statistics missing a tensor" "short.safetensors" mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" merge --config "$work/wrong.yml" --out "$work/wrong-out"
bad global "the mergekit variant with a global trim" "does not go with it" "$gradfix" merge --method ties --ties-variant mergekit --ties-scope global "${taus[@]}" --out "$work/global-out"
bad count "the mergekit variant with a count election" "--ties-elect count does not go with it" "$gradfix" merge --method ties --ties-variant mergekit --ties-elect count "${taus[@]}" --out "$work/count-out"
finish
