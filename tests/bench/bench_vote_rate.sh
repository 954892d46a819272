#!/usr/bin/env bash
# The votes pass against the machine's matrix-product rate, and against what a PyTorch user
# writes, in the same run: `signs --sign-mode max` on a generated 20M-parameter Llama-type
# directory (hidden 512, 4 layers, intermediate 1408, vocabulary 8,000, untied), 32 samples x 128
# tokens, one rank, one thread. The pass's floating-point operations are counted from the shapes
# (forward, recomputation, backward, per-sample products, the head's passes, attention); the
# ceiling is LibTorch's own products of the same shapes (gradfix_bench_matmul). Where a Python
# with torch and transformers is given (GRADFIX_BENCH_PYTHON), its per-sample loop and
# vmap(grad) run on the same thread count, and their votes are compared with gradfix's.
# Prints a table and writes a JSON copy.
#   tests/bench/bench_vote_rate.sh [BUILD_DIR] [JSON]
set -euo pipefail
if [[ "${1:-}" == -* ]] || [ $# -gt 2 ]; then
  echo "usage: tests/bench/bench_vote_rate.sh [BUILD_DIR] [JSON]   (GRADFIX_BENCH_PYTHON: a python with torch and transformers)" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:-$root/build}" && pwd)
json=$(realpath -m "${2:-bench_vote_rate.json}")
python=${GRADFIX_BENCH_PYTHON:-}
threads=${GRADFIX_BENCH_THREADS:-1}
[ -x "$build/gradfix_bench_matmul" ] || { echo "error: no $build/gradfix_bench_matmul (build with LibTorch and GRADFIX_BUILD_BENCH)" >&2; exit 2; }
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-/tmp}/gradfix-bench-rate-XXXXXX")
trap '[ -n "${GRADFIX_BENCH_KEEP:-}" ] || rm -rf "$work"' EXIT
cd "$work"
hidden=512 layers=4 inter=1408 vocab=8000 heads=8 kv=4 samples=32 tokens=128

python3 "$root/tests/bench/vote_pass.py" write "$hidden" "$layers" "$inter" "$vocab" "$heads" "$kv" "$samples" "$tokens"

"$build/gradfix" generate --shapes "$(cat shapes.txt)" --noise 0.02 --seed 1 --out model >/dev/null
cp config.json model/
best=""
for run in 1 2; do  # the faster of two runs, wall time of the whole process
  start=$(date +%s.%N)
  GRADFIX_THREADS=$threads "$build/gradfix" signs --weights model --data tokens.safetensors --sign-mode max --out votes.safetensors \
    --report-time --quiet >signs.log 2>&1 || { cat signs.log >&2; exit 1; }
  end=$(date +%s.%N)
  seconds=$(awk "BEGIN { print $end - $start }")
  inside=$(awk '/rank 0:/ { print $3 }' signs.log)
  if [ -z "$best" ] || awk "BEGIN { exit !($seconds < ${best%% *}) }"; then best="$seconds $inside"; fi
done
blas=$(grep "^BLAS" signs.log || echo "BLAS: unknown")
# The products on the kernel that gradfix ran on.
kernel=$(sed -n 's/^BLAS: OpenBLAS, kernel \([A-Za-z0-9]*\).*/\1/p' signs.log)
shapes=$(python3 -c 'import json; print(",".join(sorted({s for s, _ in json.load(open("flops.json"))["terms"]})))')
env ${kernel:+OPENBLAS_CORETYPE=$kernel} "$build/gradfix_bench_matmul" --shapes "$shapes" --threads "$threads" --json matmul.json >matmul.log

torch_rows="[]"
if [ -n "$python" ]; then
  "$python" "$root/tests/bench/pytorch_votes.py" model tokens.safetensors "$threads" torch.json votes.safetensors >torch.log 2>&1 ||
    { cat torch.log >&2; exit 1; }
  torch_rows=$(python3 -c 'import json; print(json.dumps(json.load(open("torch.json"))["rows"]))')
fi

python3 - "$best" "$threads" "$blas" "$torch_rows" "$json" <<'PY'
import json, sys
best, threads, blas, torch_rows, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
process, inside = map(float, best.split())
flops = json.load(open("flops.json"))
rates = {row["shape"]: row["gflops"] for row in json.load(open("matmul.json"))["rows"]}
total = sum(f for _, f in flops["terms"]) + flops["attention"]
ceiling_seconds = sum(f / (rates[s] * 1e9) for s, f in flops["terms"])
ceiling = sum(f for _, f in flops["terms"]) / ceiling_seconds / 1e9
rate = total / inside / 1e9
print("# gradfix bench_vote_rate: signs --sign-mode max, llama 20M (hidden 512, 4 layers, vocab 8,000), 32 samples x 128 tokens,"
      " 1 rank, %d thread(s); %s" % (threads, blas))
print("# the pass: %.1f GFLOP counted from the shapes; matmul: LibTorch's products of the same shapes, same run" % (total / 1e9))
print("# %-34s %10s %10s %14s" % ("way", "time(s)", "GFLOP/s", "vs gradfix"))
print("  %-34s %10.2f %10.1f %14s" % ("matmul ceiling, the pass's products", ceiling_seconds, ceiling, "%.2f" % (ceiling_seconds / inside)))
print("  %-34s %10.2f %10.1f %14s" % ("gradfix signs, the pass", inside, rate, "1.00"))
print("  %-34s %10.2f %10s %14s" % ("gradfix signs, whole process", process, "", "%.2f" % (process / inside)))
rows = [{"way": "matmul", "seconds": ceiling_seconds, "gflops": ceiling},
        {"way": "gradfix pass", "seconds": inside, "gflops": rate, "fraction_of_matmul": rate / ceiling},
        {"way": "gradfix process", "seconds": process}]
for row in torch_rows:
    print("  %-34s %10.2f %10s %14s" % ("PyTorch " + row["way"], row["seconds"], "", "%.2f" % (row["seconds"] / inside)))
    print("    (votes equal gradfix's on %.5f of entries)" % row["agreement_with_gradfix"])
    rows.append(dict(row, way="pytorch " + row["way"]))
print("# the pass runs at %.0f%% of the matmul rate of its shapes" % (100 * rate / ceiling))
if torch_rows:
    fastest = min(r["seconds"] for r in torch_rows)
    print("# fastest PyTorch way / gradfix's pass: %.2fx (whole process: %.2fx)" % (fastest / inside, fastest / process))
json.dump({"benchmark": "bench_vote_rate", "threads": threads, "blas": blas, "gflop": total / 1e9, "rows": rows,
           "matmul_shapes": json.load(open("matmul.json"))["rows"]}, open(out, "w"), indent=2)
print("# JSON copy: %s" % out)
PY
