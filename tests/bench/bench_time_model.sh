#!/usr/bin/env bash
# Checks docs/scale.md's time model of `signs` against measurements: two generated Llama-type
# models (20M parameters, 32 samples x 128 tokens; 0.7 GB, 16 samples x 128 tokens) at P = 1, 2
# and 4 ranks of one thread each. The model:
#
#   t(P) = ceil(G / P) x (F / G) / (eta x R) x max(1, min(P, G) / cores) + X (1 - 1 / P) / Bw
#
#   F    the pass's floating-point operations, counted from the shapes (vote_pass.py)
#   G    groups of 8 samples; a rank computes ceil(G / P) of them, and min(P, G) ranks compute at
#        once, sharing the node's cores when they are more
#   R    LibTorch's own rate on the pass's product shapes, one thread (gradfix_bench_matmul),
#        measured in this run
#   eta  the pass's efficiency against R: calibrated on the 20M model at P = 1
#   X    bytes a rank gathers whole: every layer twice (forward, recomputation), the head twice
#        (scan and gradient), the embedding rows of the data's tokens twice; the share 1 / P it
#        owns does not travel
#   Bw   the gather bandwidth: calibrated on the 20M model at P = 2 (its --report-time waits)
#
# Every other point is a prediction. Prints a table (predicted, measured, error) and writes a
# JSON copy.
#   tests/bench/bench_time_model.sh [BUILD_DIR] [JSON]
set -euo pipefail
if [[ "${1:-}" == -* ]] || [ $# -gt 2 ]; then
  echo "usage: tests/bench/bench_time_model.sh [BUILD_DIR] [JSON]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
json=$(realpath -m "${2:-bench_time_model.json}")
[ -x "$build/gradfix_bench_matmul" ] || { echo "error: no $build/gradfix_bench_matmul (build with LibTorch and GRADFIX_BUILD_BENCH)" >&2; exit 2; }
flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-/tmp}/gradfix-bench-time-XXXXXX")
trap '[ -n "${GRADFIX_BENCH_KEEP:-}" ] || rm -rf "$work"' EXIT

measure() {  # measure NAME HIDDEN LAYERS INTER VOCAB HEADS KV SAMPLES TOKENS: one line per P into runs.txt
  local name=$1
  mkdir -p "$work/$name" && cd "$work/$name"
  python3 "$root/tests/bench/vote_pass.py" write "${@:2}"
  "$build/gradfix" generate --shapes "$(cat shapes.txt)" --noise 0.02 --seed 1 --max-shard-size 500MB --out model >/dev/null
  cp config.json model/
  for ranks in 1 2 4; do
    GRADFIX_THREADS=1 mpirun "${flags[@]}" -x GRADFIX_THREADS -np "$ranks" "$build/gradfix" signs --weights model --data tokens.safetensors \
      --out votes.safetensors --report-time --quiet >signs.log 2>&1 || { cat signs.log >&2; exit 1; }
    # rank 0's wall, and the largest wait on gathers over the ranks
    echo "$name $ranks $(awk '/rank 0:/ { print $3 }' signs.log) $(awk '/ rank [0-9]+:/ { if ($5 > g) g = $5 } END { print g + 0 }' signs.log)" >>"$work/runs.txt"
  done
  kernel=$(sed -n 's/^BLAS: OpenBLAS, kernel \([A-Za-z0-9]*\).*/\1/p' signs.log)
  shapes=$(python3 -c 'import json; print(",".join(sorted({s for s, _ in json.load(open("flops.json"))["terms"]})))')
  env ${kernel:+OPENBLAS_CORETYPE=$kernel} "$build/gradfix_bench_matmul" --shapes "$shapes" --threads 1 --json matmul.json >/dev/null
  cd "$work"
}
measure small 512 4 1408 8000 8 4 32 128
measure medium 1024 8 3584 32000 16 4 16 128

python3 - "$work" "$(nproc)" "$json" <<'PY'
import json, math, sys
work, cores, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runs = {}
for line in open(work + "/runs.txt"):
    name, ranks, wall, gathers = line.split()
    runs[(name, int(ranks))] = (float(wall), float(gathers))

def model(name):
    flops = json.load(open("%s/%s/flops.json" % (work, name)))
    rates = {r["shape"]: r["gflops"] * 1e9 for r in json.load(open("%s/%s/matmul.json" % (work, name)))["rows"]}
    products = sum(f for _, f in flops["terms"])
    rate = products / sum(f / rates[s] for s, f in flops["terms"])  # R: the shapes' rate, weighted by their operations
    total = products + flops["attention"]
    return total, flops["groups"], rate, flops["gathered_bytes"]

def compute(name, ranks, eta):
    total, groups, rate, _ = model(name)
    return math.ceil(groups / ranks) * (total / groups) / (eta * rate) * max(1.0, min(ranks, groups) / cores)

total, groups, rate, gathered = model("small")
eta = total / (runs[("small", 1)][0] * rate)  # calibration 1: everything at P = 1 counts against eta
bandwidth = gathered * 0.5 / max(1e-9, runs[("small", 2)][1])  # calibration 2: the waits at P = 2
print("# gradfix bench_time_model: signs, ranks of one thread, %d cores; eta = %.2f (20M, P = 1), gather bandwidth %.2f GB/s (20M, P = 2)"
      % (cores, eta, bandwidth / 1e9))
print("# %-8s %5s %12s %12s %10s %14s  %s" % ("model", "ranks", "predicted(s)", "measured(s)", "error", "R (GFLOP/s)", "role"))
rows, worst = [], 0.0
for name in ("small", "medium"):
    _, _, rate, gathered = model(name)
    for ranks in (1, 2, 4):
        predicted = compute(name, ranks, eta) + gathered * (1 - 1 / ranks) / bandwidth
        measured = runs[(name, ranks)][0]
        error = (predicted - measured) / measured
        role = {("small", 1): "calibrates eta", ("small", 2): "calibrates Bw"}.get((name, ranks), "prediction")
        if role == "prediction":
            worst = max(worst, abs(error))
        print("  %-8s %5d %12.2f %12.2f %9.1f%% %14.1f  %s" % (name, ranks, predicted, measured, 100 * error, rate / 1e9, role))
        rows.append({"model": name, "ranks": ranks, "predicted_s": predicted, "measured_s": measured, "error": error, "role": role,
                     "matmul_gflops": rate / 1e9, "gathers_s": runs[(name, ranks)][1]})
print("# largest error of a prediction: %.1f%% (target: within 20%%)" % (100 * worst))
json.dump({"benchmark": "bench_time_model", "cores": cores, "eta": eta, "gather_bandwidth": bandwidth, "rows": rows,
           "largest_prediction_error": worst}, open(out, "w"), indent=2)
print("# JSON copy: %s" % out)
PY
