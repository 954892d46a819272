#!/usr/bin/env bash
# apply and mask on a bf16 model (default 2 GB) at P = 1, 2 (and 4 for memory) ranks: wall time
# of the whole command (MPI start-up included, as a user sees it), throughput of the output bytes,
# the ratio to a plain copy of the same bytes (dd with fsync) measured in the same run, the
# speed-up over P = 1, and the peak resident memory of the largest rank against the target
# model/P + 256 MiB. Prints a table and writes a JSON copy.
#   tests/bench/bench_ranks.sh [GRADFIX_BINARY] [SIZE_BYTES] [JSON]
set -euo pipefail
if [ $# -gt 3 ] || [[ "${1:-}" == -* ]]; then
  echo "usage: tests/bench/bench_ranks.sh [GRADFIX_BINARY] [SIZE_BYTES] [JSON]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=${1:-$root/build/gradfix}
size=${2:-2000000000}
json=${3:-bench_ranks.json}
flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-/tmp}/gradfix-bench-ranks-XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

# Square 4096-row matrices of bf16, 16M elements (32 MB) each.
source "$root/tests/bench/bench_common.sh"
shapes=$(block_shapes $((size / 2)))
mpirun "${flags[@]}" -np 2 "$gradfix" generate --shapes "$shapes" --dtype BF16 --noise 0.1 --seed 1 --out base.safetensors >/dev/null
mpirun "${flags[@]}" -np 2 "$gradfix" generate --like base.safetensors --like-scale 0 --noise 0.01 --seed 2 --out tau.safetensors >/dev/null
mpirun "${flags[@]}" -np 2 "$gradfix" generate --like base.safetensors --like-scale 0 --noise 1 --seed 3 --out signs.safetensors >/dev/null
bytes=$(stat -c %s base.safetensors)

calc() { awk "BEGIN { print $1 }"; }
seconds() { local start end; start=$(date +%s.%N); "$@" >run.log 2>&1; end=$(date +%s.%N); calc "$end - $start"; }
# Every input read once before timing, so that each command finds the same page-cache state.
cat base.safetensors tau.safetensors signs.safetensors >/dev/null
copy=$(seconds dd if=base.safetensors of=copy.safetensors bs=8M conv=fsync)
rm -f copy.safetensors

printf '# gradfix bench_ranks: %s bytes of bf16, %s cores\n' "$bytes" "$(nproc)"
printf '# %6s %6s %10s %10s %10s %10s %14s %14s\n' op ranks "time(s)" "GB/s" "vs copy" speedup "peak RSS(MiB)" "target(MiB)"
printf '  %6s %6s %10.2f %10.3f %10.2f %10s %14s %14s\n' copy 1 "$copy" "$(calc "$bytes / $copy / 1e9")" 1 - - -
rows=""
declare -A first
for op in apply mask; do
  for ranks in 1 2 4; do
    case $op in
      apply) command=(apply --base base.safetensors --task-vector tau.safetensors --alpha 0.5 --out out.safetensors) ;;
      mask) command=(mask --task-vector tau.safetensors --signs signs.safetensors --out out.safetensors) ;;
    esac
    time=$(seconds mpirun "${flags[@]}" -np "$ranks" "$gradfix" "${command[@]}" --report-memory)
    peak=$(grep "peak resident memory" run.log | tr ' ' '\n' | grep -E '^[0-9]+$' | sort -n | tail -1)
    target=$((bytes / ranks / 1048576 + 256))
    [ -n "${first[$op]:-}" ] || first[$op]=$time
    speedup=$(calc "${first[$op]} / $time")
    rate=$(calc "$bytes / $time / 1e9")
    ratio=$(calc "$time / $copy")
    # The output must be the same bytes at every rank count: the first run's is the reference.
    if [ "$ranks" -eq 1 ]; then
      mv out.safetensors "reference_$op.safetensors"
    elif ! cmp -s out.safetensors "reference_$op.safetensors"; then
      echo "error: $op at $ranks ranks wrote other bytes than at 1 rank: the timing means nothing" >&2
      exit 1
    fi
    printf '  %6s %6d %10.2f %10.3f %10.2f %10.2f %14d %14d\n' "$op" "$ranks" "$time" "$rate" "$ratio" "$speedup" "$peak" "$target"
    rows+="${rows:+,}{\"op\":\"$op\",\"ranks\":$ranks,\"seconds\":$time,\"gb_per_s\":$rate,\"time_vs_copy\":$ratio,\"speedup_vs_1\":$speedup,\"peak_rss_mib\":$peak,\"target_mib\":$target}"
    rm -f out.safetensors
  done
done
cd - >/dev/null
printf '{"benchmark":"bench_ranks","bytes":%s,"cores":%s,"copy_seconds":%s,"rows":[%s]}\n' "$bytes" "$(nproc)" "$copy" "$rows" >"$json"
echo "# JSON copy: $json"
