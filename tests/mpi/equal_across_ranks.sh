#!/usr/bin/env bash
# Every subcommand under `mpirun -np P` writes the same bytes as one plain process: each mask
# mode, each merge, election, scope and order, each output format. Tensors are cut across ranks
# (a large vector and matrices with rows split), and small chunks exercise the chunking.
#   equal_across_ranks.sh GRADFIX_BINARY P
set -euo pipefail
gradfix=$1
ranks=$2
source "$(dirname "$0")/common.sh"
work=$(mktemp -d /tmp/gradfix-mpi-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

shapes="embed=300x64,block.0.weight=64x64,block.0.bias=64,block.1.weight=32x64,long_vector=10000,scale=,empty=0x4"
file_job_inputs "$gradfix" "$shapes"

run_all() {  # run_all OUTPUT_DIR [LAUNCHER...]
  local out=$1
  shift
  mkdir -p "$out"
  local g=("$@" "$gradfix")
  local small=(--chunk-elements 999)
  "${g[@]}" taskvector --base base.safetensors --finetuned ft.safetensors --out "$out/tau.safetensors" "${small[@]}"
  "${g[@]}" apply --base base.safetensors --task-vector "$out/tau.safetensors" --alpha 0.7 --out "$out/applied.h5" "${small[@]}"
  for mode in normal force random soft1 soft2 soft3 soft1_rowwise soft2_rowwise soft3_rowwise oracle; do
    "${g[@]}" mask --task-vector "$out/tau.safetensors" --signs signs.h5 --mask-mode "$mode" --seed 7 \
      --out "$out/mask_$mode" --max-shard-size 40KB "${small[@]}"
  done
  "${g[@]}" merge --task-vector "$out/tau.safetensors" --task-vector tau2.safetensors --method mean --out "$out/merge_mean.safetensors"
  "${g[@]}" merge --task-vector "$out/tau.safetensors" --task-vector tau2.safetensors --method sum --out "$out/merge_sum.h5"
  for scope in tensor global; do
    for elect in count mass; do
      "${g[@]}" merge --task-vector "$out/tau.safetensors" --task-vector tau2.safetensors --method ties --ties-fraction 0.1 \
        --ties-scope "$scope" --ties-elect "$elect" --out "$out/merge_ties_${scope}_$elect.safetensors" "${small[@]}"
    done
  done
  for order in mask-then-merge merge-then-mask; do
    for mode in normal soft1; do
      "${g[@]}" merge --task-vector "$out/tau.safetensors" --task-vector tau2.safetensors --signs signs.h5 --signs signs2.safetensors \
        --order "$order" --mask-mode "$mode" --method ties --out "$out/merge_${order}_$mode.safetensors" "${small[@]}"
    done
  done
  "${g[@]}" convert "$out/mask_normal" "$out/repacked.safetensors"
  "${g[@]}" convert "$out/applied.h5" "$out/applied.safetensors" --out-dtype F32
  "${g[@]}" generate --like base.safetensors --noise 0.5 --seed 9 --out "$out/generated.h5" "${small[@]}"
  "${g[@]}" inspect "$out/tau.safetensors" ft.safetensors --json "$out/inspect.json" >/dev/null
}

run_all reference >/dev/null
run_all ranks mpirun "${mpirun_flags[@]}" -np "$ranks" >/dev/null

count=0
while IFS= read -r file; do
  count=$((count + 1))
  case "$file" in
    *.json) check "$file exists" test -s "ranks/$file" ;;  # reports: sums in another order
    *) check "$file is byte-identical with $ranks ranks" cmp -s "reference/$file" "ranks/$file" ;;
  esac
done < <(cd reference && find . -type f | sort)
check "outputs were produced ($count files)" test "$count" -ge 40
check "no temporary file was left" test -z "$(find . -name '.*.tmp-*')"
finish
