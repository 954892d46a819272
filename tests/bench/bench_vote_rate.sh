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
timed_signs() {  # timed_signs VOTES [OPTIONS...]: "process-seconds pass-seconds", the faster of two runs
  local votes=$1 best="" start end seconds inside
  shift
  for run in 1 2; do
    start=$(date +%s.%N)
    GRADFIX_THREADS=$threads "$build/gradfix" signs --weights model --data tokens.safetensors --sign-mode max --out "$votes" \
      --report-time --quiet "$@" >signs.log 2>&1 || { cat signs.log >&2; exit 1; }
    end=$(date +%s.%N)
    seconds=$(awk "BEGIN { print $end - $start }")
    inside=$(awk '/rank 0:/ { print $3 }' signs.log)
    if [ -z "$best" ] || awk "BEGIN { exit !($seconds < ${best%% *}) }"; then best="$seconds $inside"; fi
  done
  echo "$best"
}
# --vote-precision bf16 first, so that signs.log is the float32 run's.
best_bf16=$(timed_signs votes_bf16.safetensors --vote-precision bf16)
best=$(timed_signs votes.safetensors)
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

python3 - "$best" "$threads" "$blas" "$torch_rows" "$json" "$best_bf16" <<'PY'
import json, struct, sys
best, threads, blas, torch_rows, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
process, inside = map(float, best.split())
process_bf16, inside_bf16 = map(float, sys.argv[6].split())

def vote_bytes(path):  # the I8 votes of every tensor, in name order
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n]); header.pop("__metadata__", None)
    return b"".join(raw[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]] for _, e in sorted(header.items()))
f32_votes, bf16_votes = vote_bytes("votes.safetensors"), vote_bytes("votes_bf16.safetensors")
changed = sum(1 for a, b in zip(f32_votes, bf16_votes) if a != b)
by_one = sum(1 for a, b in zip(f32_votes, bf16_votes) if a != b and abs(((a + 128) % 256) - ((b + 128) % 256)) <= 2)
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
print("  %-34s %10.2f %10.1f %14s" % ("gradfix signs, bf16 products, pass", inside_bf16, total / inside_bf16 / 1e9, "%.2f" % (inside_bf16 / inside)))
print("    (votes equal float32's on %.5f of entries; of the %d that differ, %d by one sample's vote)"
      % (1 - changed / len(f32_votes), changed, by_one))
rows = [{"way": "matmul", "seconds": ceiling_seconds, "gflops": ceiling},
        {"way": "gradfix pass", "seconds": inside, "gflops": rate, "fraction_of_matmul": rate / ceiling},
        {"way": "gradfix process", "seconds": process},
        {"way": "gradfix pass, bf16 products", "seconds": inside_bf16, "gflops": total / inside_bf16 / 1e9, "process_seconds": process_bf16,
         "entries": len(f32_votes), "votes_changed": changed, "votes_changed_by_one_sample": by_one}]
for row in torch_rows:
    print("  %-34s %10.2f %10s %14s" % ("PyTorch " + row["way"], row["seconds"], "", "%.2f" % (row["seconds"] / inside)))
    print("    (votes equal gradfix's on %.5f of entries)" % row["agreement_with_gradfix"])
    rows.append(dict(row, way="pytorch " + row["way"]))
print("# the pass runs at %.0f%% of the matmul rate of its shapes" % (100 * rate / ceiling))
if torch_rows:
    fastest = min(r["seconds"] for r in torch_rows)
    print("# fastest PyTorch way / gradfix's pass: %.2fx (whole process: %.2fx); with bf16 products: %.2fx (%.2fx)"
          % (fastest / inside, fastest / process, fastest / inside_bf16, fastest / process_bf16))
json.dump({"benchmark": "bench_vote_rate", "threads": threads, "blas": blas, "gflop": total / 1e9, "rows": rows,
           "matmul_shapes": json.load(open("matmul.json"))["rows"]}, open(out, "w"), indent=2)
print("# JSON copy: %s" % out)
PY
