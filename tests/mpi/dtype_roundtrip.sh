#!/usr/bin/env bash
# Exact dtypes (issue 8): a checkpoint holding every dtype gradfix reads, with the values a route
# through fp32 would break (1/3, 1e-300 and 1e300 in F64, 2^53 + 1 in I64, 8-bit floats),
# written by PyTorch (tests/fixtures/dtypes), goes through every format at P = 1..4 ranks and
# back, bit for bit; conversions to BF16 and the 8-bit floats equal PyTorch's; the rules for
# integer tensors and mixed dtypes hold (taskvector leaves integers out, apply copies them from
# the base, mask refuses them, a BF16 base with an F32 task vector stays BF16 with a notice).
#   dtype_roundtrip.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$(dirname "$0")/common.sh"
fixtures=$repo/tests/fixtures/dtypes
same=$repo/tests/support/same_tensors.py
work=$(mktemp -d /tmp/gradfix-dtypes-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

for ranks in 1 2 3 4; do
  g=(mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix")
  for out in copy.safetensors copy_dir copy.h5; do
    "${g[@]}" convert "$fixtures/every.safetensors" "p$ranks-$out" --allow-nonfinite --chunk-elements 7 >/dev/null
    "${g[@]}" convert "p$ranks-$out" "p$ranks-$out.back.safetensors" --allow-nonfinite --chunk-elements 5 >/dev/null
    check "P=$ranks: every dtype through $out and back is bit-exact" "$same" "$fixtures/every.safetensors" "p$ranks-$out.back.safetensors"
  done
  check "P=$ranks: the directory holds the same bytes" "$same" "$fixtures/every.safetensors" "p$ranks-copy_dir"
done

# Conversions to narrow floats equal PyTorch's .to(dtype) (F32 and narrower sources; integers kept).
for target in bf16:BF16 f8_e4m3:F8_E4M3 f8_e5m2:F8_E5M2; do
  name=${target%%:*}
  mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" convert "$fixtures/every.safetensors" "as_$name.safetensors" \
    --out-dtype "${target#*:}" --exclude '^f64$' --allow-nonfinite --chunk-elements 7 >/dev/null
  check "convert --out-dtype ${target#*:} equals PyTorch" "$same" "$fixtures/every_as_$name.safetensors" "as_$name.safetensors"
done
# Without --allow-nonfinite, values past the target's range are refused, naming the tensor.
expect_exit2 "F32 3.4e38 does not fit BF16" "tensor 'f32'.*beyond the range of BF16" \
  "$gradfix" convert "$fixtures/every.safetensors" refused.safetensors --out-dtype bf16 --include '^f32$'
check "nothing written on refusal" test ! -e refused.safetensors
# A finite F64 value stays finite: 1e300 is accepted in F64 and refused only when it cannot fit.
check "F64 1e300 copies without --allow-nonfinite" "$gradfix" convert "$fixtures/every.safetensors" f64.safetensors --include '^f64$'
expect_exit2 "F64 1e300 to F32" "tensor 'f64'.*beyond the range of F32" \
  "$gradfix" convert "$fixtures/every.safetensors" f64to32.safetensors --include '^f64$' --out-dtype F32

# F64 arithmetic in F64: masks and merges of an F64 vector keep its values exactly where the
# arithmetic is exact (normal mask by its own signs, the mean and TIES of two copies, a whole-model
# task arithmetic from a zero base), at 1 to 3 ranks; fp32 would turn 1/3 into 0.33333334. (Equal
# values, not bytes: a merge sums from +0, so the -0.0 in the vector comes out +0.)
exact() { "$repo/tests/support/close_tensors.py" "$1" "$2" --abs 0 --rel 0 >/dev/null; }
"$gradfix" convert "$fixtures/every.safetensors" x64.safetensors --include '^f64$' >/dev/null
"$gradfix" taskvector --base x64.safetensors --finetuned x64.safetensors --out zero64.safetensors >/dev/null
printf 'merge_method: task_arithmetic\nbase_model: zero64.safetensors\nmodels:\n  - model: x64.safetensors\n    parameters: {weight: 1}\n' >f64.yml
for ranks in 1 3; do
  g=(mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix")
  "${g[@]}" mask --task-vector x64.safetensors --signs x64.safetensors --out "mask64-p$ranks.safetensors" --chunk-elements 7 >/dev/null
  check "P=$ranks: an F64 vector masked by its own signs keeps every value" "$same" x64.safetensors "mask64-p$ranks.safetensors"
  for method in "mean" "ties --ties-fraction 1" "ties --ties-fraction 1 --ties-variant mergekit"; do
    # shellcheck disable=SC2086
    "${g[@]}" merge --task-vector x64.safetensors --task-vector x64.safetensors --method $method --out "merge64-p$ranks.safetensors" \
      --chunk-elements 7 >/dev/null
    check "P=$ranks: merge $method of two copies of an F64 vector is the vector" exact "merge64-p$ranks.safetensors" x64.safetensors
  done
  "${g[@]}" merge --config f64.yml --out "model64-p$ranks.safetensors" --chunk-elements 7 >/dev/null
  check "P=$ranks: an F64 task arithmetic from a zero base is the model" exact "model64-p$ranks.safetensors" x64.safetensors
done

# Integer tensors and mixed dtypes.
"$gradfix" convert "$fixtures/every.safetensors" base.safetensors --exclude '^f8' --allow-nonfinite >/dev/null
"$gradfix" generate --like base.safetensors --noise 0.5 --seed 3 --out ft.safetensors --allow-nonfinite >/dev/null
"$gradfix" taskvector --base base.safetensors --finetuned ft.safetensors --out tau.safetensors --allow-nonfinite >log.txt
check "taskvector names the integer tensors it leaves out" grep -q "integer tensor(s) left out.*'i64'" log.txt
check "the task vector holds no integer tensor" bash -c "! '$gradfix' inspect tau.safetensors | grep -qE '^(i64|u8|bool) '"
check "a BF16 task vector entry is F32" bash -c "'$gradfix' inspect tau.safetensors | grep -qE '^bf16 +F32'"
check "an F64 task vector entry stays F64" bash -c "'$gradfix' inspect tau.safetensors | grep -qE '^f64 +F64'"
"$gradfix" apply --base base.safetensors --task-vector tau.safetensors --alpha 1 --out applied.safetensors --allow-nonfinite >log.txt
check "apply copies integer tensors from the base" bash -c \
  "'$gradfix' convert applied.safetensors ints.safetensors --include '^(i|u)[0-9]+$|^bool$' >/dev/null &&
   '$gradfix' convert base.safetensors base_ints.safetensors --include '^(i|u)[0-9]+$|^bool$' >/dev/null &&
   '$same' ints.safetensors base_ints.safetensors"
check "apply announces the BF16 base with an F32 task vector" grep -q "differ in dtype.*'bf16': BF16 in the base, F32 in the task vector" log.txt
check "the applied BF16 tensor stays BF16" bash -c "'$gradfix' inspect applied.safetensors | grep -qE '^bf16 +BF16'"
"$gradfix" generate --like base.safetensors --like-scale 0 --noise 1 --seed 4 --out signs.safetensors --allow-nonfinite >/dev/null
expect_exit2 "mask refuses an integer tensor" "tensor '[iu][0-9]*' is [IU][0-9]*; mask works on float tensors only" \
  "$gradfix" mask --task-vector base.safetensors --signs signs.safetensors --out masked.safetensors --allow-nonfinite
finish
