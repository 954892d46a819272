#!/usr/bin/env bash
# LibTorch threads per rank: the ranks of a node share its cores (configure_threads: the
# affinity mask, divided among the node's ranks when the launcher bound nothing) against every
# rank taking all of them (LibTorch's default, forced here with GRADFIX_THREADS = cores). Ranks
# unbound (mpirun --bind-to none), P = 2: `train` (every rank trains the same replica) and `signs
# --method loop` (the shots split over the ranks) on the built-in ViT and Fashion-MNIST. Prints a
# table and writes a JSON copy; the outputs of both settings must be byte-identical.
# A second table: one rank, its LibTorch pool on every core, with and without a pthreads OpenBLAS
# pool of its own beside it (OPENBLAS_NUM_THREADS = cores, what every run had before
# configure_threads gave OpenBLAS one thread), `train` of the demo's MLP 784-512-512-10 and of the
# ViT.
#   tests/bench/bench_threads.sh [GRADFIX_BINARY] [JSON]
set -euo pipefail
if [[ "${1:-}" == -* ]] || [ $# -gt 2 ]; then
  echo "usage: tests/bench/bench_threads.sh [GRADFIX_BINARY] [JSON]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=$(realpath "${1:-$root/build/gradfix}")
json=$(realpath -m "${2:-bench_threads.json}")
data=/usr/share/datasets/fashion-mnist
cores=$(nproc)
flags=(--oversubscribe --bind-to none)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
work=$(mktemp -d /tmp/gradfix-bench-threads-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$gradfix" init --arch vit --dims 1,28,28,7,64,2,4,128,10 --seed 1 --out vit.safetensors >/dev/null
calc() { awk "BEGIN { print $1 }"; }
seconds_of() {  # seconds_of COMMAND...: the wall time of one run, its output discarded
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null
  end=$(date +%s.%N)
  calc "$end - $start"
}
run() {  # run SETTING NAME ARGS...: seconds
  local setting=$1 name=$2
  shift 2
  if [ "$setting" = all ]; then
    seconds_of env GRADFIX_THREADS="$cores" mpirun "${flags[@]}" -x GRADFIX_THREADS -np 2 "$gradfix" "$@" --out "$name"
  else
    seconds_of mpirun "${flags[@]}" -np 2 "$gradfix" "$@" --out "$name"
  fi
}
printf '# gradfix bench_threads: 2 ranks unbound on %s cores; built-in ViT 28x28, width 64, depth 2\n' "$cores"
printf '# %-8s %22s %22s %8s\n' job "all cores/rank (s)" "cores/ranks (s)" ratio
rows=""
for job in train signs; do
  if [ "$job" = train ]; then
    args=(train --weights vit.safetensors --data "$data:train" --limit 4000 --epochs 1 --seed 1 --quiet)
  else
    args=(signs --weights vit.safetensors --data "$data:t10k" --shots-per-class 20 --method loop --seed 1 --quiet)
  fi
  before=$(run all "before_$job.safetensors" "${args[@]}")
  after=$(run shared "after_$job.safetensors" "${args[@]}")
  cmp -s "before_$job.safetensors" "after_$job.safetensors" || echo "note: $job outputs differ between thread counts (float summation order)" >&2
  ratio=$(calc "$before / $after")
  printf '  %-8s %22.2f %22.2f %8.2f\n' "$job" "$before" "$after" "$ratio"
  rows+="${rows:+,}{\"job\":\"$job\",\"all_cores_seconds\":$before,\"shared_cores_seconds\":$after,\"speedup\":$ratio}"
done
"$gradfix" init --arch mlp --dims 784,512,512,10 --seed 1 --out mlp.safetensors >/dev/null
solo() {  # solo BLAS_THREADS ARGS...: seconds of one rank (BLAS_THREADS empty: gradfix's default)
  local blas=$1
  shift
  if [ -n "$blas" ]; then seconds_of env OPENBLAS_NUM_THREADS="$blas" "$gradfix" "$@"; else seconds_of "$gradfix" "$@"; fi
}
printf '# one rank, LibTorch on %s cores: with a pthreads OpenBLAS pool beside it, and with OpenBLAS on one thread\n' "$cores"
printf '# %-8s %22s %22s %8s\n' job "two pools (s)" "one pool (s)" ratio
solo_rows=""
for model in mlp vit; do
  limit=4000
  [ "$model" = mlp ] && limit=20000
  args=(train --weights "$model.safetensors" --data "$data:train" --limit "$limit" --epochs 1 --seed 1 --quiet)
  before=$(solo "$cores" "${args[@]}" --out "solo_before_$model.safetensors")
  after=$(solo "" "${args[@]}" --out "solo_after_$model.safetensors")
  ratio=$(calc "$before / $after")
  printf '  %-8s %22.2f %22.2f %8.2f\n' "train-$model" "$before" "$after" "$ratio"
  solo_rows+="${solo_rows:+,}{\"job\":\"train-$model\",\"two_pools_seconds\":$before,\"one_pool_seconds\":$after,\"speedup\":$ratio}"
done
printf '{"benchmark":"bench_threads","ranks":2,"cores":%s,"rows":[%s],"one_rank_rows":[%s]}\n' "$cores" "$rows" "$solo_rows" >"$json"
echo "# JSON copy: $json"
