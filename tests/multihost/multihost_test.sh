#!/usr/bin/env bash
# gradfix across hosts: mpirun starts ranks on separate network hosts (namespaces with their own
# addresses and host names, hosts.sh) through a launch agent as it would over ssh, and the ranks
# talk over TCP. The file jobs (taskvector, apply to HDF5 through MPI-IO, mask, merge with masks,
# convert) and the model jobs (signs, transport on a small decoder) write the same bytes at 2
# hosts x 2 ranks and 3 hosts x 1 rank as one process on one host; each job names the hosts its
# ranks run on. Skipped (exit 77) where namespaces cannot be made.
#   multihost_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
source "$repo/tests/multihost/hosts.sh"
hosts_or_skip
model=$repo/tests/fixtures/decoders/llama/model
# Under the hosts' shared directory: each host has its own /tmp.
work=$(mktemp -d "$shared_dir"/gradfix-multihost-XXXXXX)
hosts_cleanup_extra="rm -rf '$work'"
hosts_up 3
cd "$work"

# Inputs: tensors cut across ranks (rows split, a long vector), BF16 like a real checkpoint.
shapes="embed=300x64,block.0.weight=64x64,block.0.bias=64,block.1.weight=32x64,long_vector=10000,scale="
file_job_inputs "$gradfix" "$shapes"
# Token data for the decoder (each sequence counts upwards mod 96 from a random start).
"$repo/tests/support/token_data.py" pool.safetensors 24 8 1
"$repo/tests/support/token_data.py" test.safetensors 8 8 2
"$gradfix" generate --like "$model" --like-scale 1 --noise 0.01 --seed 5 --out A_ft >/dev/null
"$gradfix" taskvector --base "$model" --finetuned A_ft --out decoder_tau.safetensors >/dev/null

run_all() {  # run_all OUTPUT_DIR [LAUNCHER...]: every job, outputs under OUTPUT_DIR, logs in OUTPUT_DIR.log
  local out=$1
  shift
  mkdir -p "$out"
  local g=("$@" "$gradfix")
  local small=(--chunk-elements 999)
  {
    "${g[@]}" taskvector --base base.safetensors --finetuned ft.safetensors --out "$out/tau.safetensors" "${small[@]}"
    "${g[@]}" apply --base base.safetensors --task-vector "$out/tau.safetensors" --alpha 0.7 --out "$out/applied.h5" "${small[@]}"
    "${g[@]}" mask --task-vector "$out/tau.safetensors" --signs signs.h5 --mask-mode soft1 --out "$out/masked" --max-shard-size 40KB "${small[@]}"
    "${g[@]}" merge --task-vector "$out/tau.safetensors" --task-vector tau2.safetensors --signs signs.h5 --signs signs2.safetensors \
      --order mask-then-merge --method ties --out "$out/merged.safetensors" "${small[@]}"
    "${g[@]}" convert "$out/masked" "$out/masked.h5"
    "${g[@]}" signs --weights "$model" --data pool.safetensors --num-samples 16 --seed 3 --out "$out/decoder_signs.safetensors"
    "${g[@]}" transport --target "$model" --task-vector decoder_tau.safetensors --data pool.safetensors --test-data test.safetensors \
      --num-samples 4 --seed 3 --support-size 8 --alphas 0.5,1 --no-few-shot-baseline --out "$out/transported" --results "$out/results.json"
  } >"$out.log" 2>&1
}

run_all reference
mpirun_hosts 2 2
run_all two_by_two mpirun "${mpirun_flags[@]}" -np 4 --bind-to none "${mpirun_host_flags[@]}"
mpirun_hosts 1 1 1
run_all three_by_one mpirun "${mpirun_flags[@]}" -np 3 --bind-to none "${mpirun_host_flags[@]}"

for layout in two_by_two three_by_one; do
  count=0
  while IFS= read -r file; do
    count=$((count + 1))
    check "$layout: $file byte-identical with one process" cmp -s "reference/$file" "$layout/$file"
  done < <(cd reference && find . -type f | sort)
  check "$layout: every output was written ($count files)" test "$count" -ge 12
done
check "2 hosts x 2 ranks: each file job names both hosts and their ranks" \
  test "$(grep -c '^gradfix: 2 hosts: host1 ranks 0-1, host2 ranks 2-3$' two_by_two.log)" -eq 5
check "3 hosts x 1 rank: each file job names the three hosts" \
  test "$(grep -c '^gradfix: 3 hosts: host1 rank 0, host2 rank 1, host3 rank 2$' three_by_one.log)" -eq 5
# The model jobs' LibTorch threads: the launcher binds nothing (--bind-to none), so each rank
# takes its host's cores divided among the ranks on that host (docs/cluster.md, GRADFIX_THREADS).
threads() { local n=$(( $(nproc) / $1 )); [ "$n" -ge 1 ] || n=1; [ "$n" -eq 1 ] && echo "1 thread" || echo "$n threads"; }
check "2 hosts x 2 ranks: signs and transport divide each host's cores between its two ranks" \
  test "$(grep -c "^gradfix: 2 hosts: host1 ranks 0-1 ($(threads 2) each), host2 ranks 2-3 ($(threads 2) each)$" two_by_two.log)" -eq 2
check "3 hosts x 1 rank: signs and transport give each rank its host's cores" \
  test "$(grep -c "^gradfix: 3 hosts: host1 rank 0 ($(threads 1)), host2 rank 1 ($(threads 1)), host3 rank 2 ($(threads 1))$" three_by_one.log)" -eq 2
check "MPI's nodes are the hosts (node-local ranks count per host)" bash -c "! grep -q 'MPI groups the ranks' two_by_two.log three_by_one.log"
# An error only the last rank sees (a NaN in the last element, in its shard) is reported by that
# rank, naming its own host; nothing is published.
cp base.safetensors nan.safetensors
size=$(stat -c %s nan.safetensors)
printf '\xff\xff' | dd of=nan.safetensors bs=1 seek=$((size - 2)) conv=notrunc 2>/dev/null
for layout in "4 2 2 3/4 host2" "3 1 1 1 2/3 host3"; do
  read -r ranks slots_and_rest <<<"$layout"
  set -- $slots_and_rest
  rank=${*: -2:1} host=${*: -1}
  mpirun_hosts "${@:1:$(($# - 2))}"
  set +e
  mpirun "${mpirun_flags[@]}" -np "$ranks" "${mpirun_host_flags[@]}" "$gradfix" apply --base base.safetensors --task-vector nan.safetensors \
    --out "nan_$ranks.safetensors" >nan.log 2>&1
  code=$?
  set -e
  check "$ranks ranks: a NaN only rank $rank reads fails the job (exit $code)" test "$code" -ne 0
  check "$ranks ranks: the error names rank $rank and its host $host" grep -q "\[rank $rank on $host\] .*nan.safetensors: tensor 'scale'" nan.log
  check "$ranks ranks: nothing is published" test ! -e "nan_$ranks.safetensors"
done
check "no temporary file was left" test -z "$(find . -name '.*.tmp-*')"
for i in 1 2 3; do
  check "no process is left on host$i" test -z "$(ip netns pids "${host_netns[$i]}")"
done
finish
