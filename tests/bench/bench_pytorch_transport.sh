#!/usr/bin/env bash
# gradfix transport against the same transport written directly in PyTorch
# (tests/bench/pytorch_transport.py), in the same run on the same machine: the demo's releases
# (MLPs 784-512-512-10, from `gradfix demo --cache CACHE`), tau_A of its contrast:0.5 task, the
# shots and support set gradfix chose (saved with --save-indices and --save-support and read by
# the script), K = 1, 2, 5, 10 shots per class, sign mode max, the demo's alpha grid, no few-shot
# fine-tuning row and no B fine-tuned (the rows both compute: zero-shot, naive, GradFix). Each
# side runs REPEAT times (default 3); the table has the fastest: the whole process's wall time
# and the transport alone (statistics, mask, the alpha searches, the test evaluations; each
# side's own clock, in its results JSON), their ratio, and the two sides' GradFix alpha, kept
# fraction and test accuracy. A JSON copy is written.
#   tests/bench/bench_pytorch_transport.sh CACHE [GRADFIX] [JSON] [REPEAT]
# PYTHON names an interpreter with torch and numpy (default: python3).
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: tests/bench/bench_pytorch_transport.sh CACHE [GRADFIX] [JSON] [REPEAT]   (CACHE: a 'gradfix demo --cache' directory)" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=$(realpath "$1")
gradfix=$(realpath "${2:-$root/build/gradfix}")
json=$(realpath -m "${3:-bench_pytorch_transport.json}")
repeat=${4:-3}
python=${PYTHON:-python3}
data=${GRADFIX_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
task=contrast:0.5
alphas=0.1,0.25,0.5,0.75,1,1.5,2,3,4,5
for file in A_base B_base A_ft-contrast_0.5; do
  [ -f "$cache/$file.safetensors" ] || { echo "bench_pytorch_transport.sh: $cache/$file.safetensors is missing: run 'gradfix demo --cache $cache' first" >&2; exit 2; }
done
"$python" -c 'import torch, numpy' 2>/dev/null || { echo "bench_pytorch_transport.sh: $python cannot import torch and numpy (set PYTHON)" >&2; exit 2; }
work=$(mktemp -d /tmp/gradfix-bench-pytorch-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$gradfix" taskvector --base "$cache/A_base.safetensors" --finetuned "$cache/A_ft-contrast_0.5.safetensors" --out tau.safetensors --quiet >/dev/null
now() { date +%s.%N; }
calc() { awk "BEGIN { print $1 }"; }
printf '# gradfix transport against PyTorch %s (pytorch_transport.py), task %s, MLP 784-512-512-10, %s cores, best of %s\n' \
  "$("$python" -c 'import torch; print(torch.__version__)')" "$task" "$(nproc)" "$repeat"
printf '# %3s %11s %11s %11s %11s %8s %8s   %-22s %-22s %-22s\n' K "gf wall(s)" "gf tr.(s)" "pt wall(s)" "pt tr.(s)" "wall x" "tr. x" \
  "alpha gf/pt" "kept gf/pt" "accuracy gf/pt"
rows=""
for shots in 1 2 5 10; do
  best_gf_wall=1e9 best_gf_tr=1e9 best_pt_wall=1e9 best_pt_tr=1e9
  for ((run = 0; run < repeat; ++run)); do
    start=$(now)
    "$gradfix" transport --target "$cache/B_base.safetensors" --task-vector tau.safetensors --data "$data:train" --test-data "$data:t10k" \
      --transform "$task" --shots-per-class "$shots" --seed 0 --support-size 200 --alphas "$alphas" --no-few-shot-baseline \
      --save-indices shots.txt --save-support support.txt --results gradfix.json --quiet >/dev/null
    end=$(now)
    best_gf_wall=$(calc "($end - $start) < $best_gf_wall ? $end - $start : $best_gf_wall")
    best_gf_tr=$("$python" -c "import json; t = json.load(open('gradfix.json'))['seconds']['transport']; print(min(t, $best_gf_tr))")
    start=$(now)
    "$python" "$root/tests/bench/pytorch_transport.py" --target "$cache/B_base.safetensors" --task-vector tau.safetensors --data-dir "$data" \
      --transform "$task" --shots shots.txt --support support.txt --alphas "$alphas" --sign-mode max --results pytorch.json
    end=$(now)
    best_pt_wall=$(calc "($end - $start) < $best_pt_wall ? $end - $start : $best_pt_wall")
    best_pt_tr=$("$python" -c "import json; t = json.load(open('pytorch.json'))['seconds']['transport']; print(min(t, $best_pt_tr))")
  done
  row=$("$python" - "$shots" "$best_gf_wall" "$best_gf_tr" "$best_pt_wall" "$best_pt_tr" <<'PY'
import json, sys
shots, gf_wall, gf_tr, pt_wall, pt_tr = int(sys.argv[1]), *map(float, sys.argv[2:])
g = {r["method"]: r for r in json.load(open("gradfix.json"))["rows"]}["GradFix (max, normal)"]
p = {r["method"]: r for r in json.load(open("pytorch.json"))["rows"]}["GradFix (max, normal)"]
print(json.dumps({"shots_per_class": shots, "gradfix_wall_seconds": gf_wall, "gradfix_transport_seconds": gf_tr,
                  "pytorch_wall_seconds": pt_wall, "pytorch_transport_seconds": pt_tr, "wall_speedup": pt_wall / gf_wall,
                  "transport_speedup": pt_tr / gf_tr, "gradfix_alpha": g["alpha"], "pytorch_alpha": p["alpha"],
                  "gradfix_kept": g["kept"], "pytorch_kept": p["kept"], "gradfix_test_accuracy": g["test_accuracy"],
                  "pytorch_test_accuracy": p["test_accuracy"]}))
PY
)
  "$python" - "$row" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print("  %3d %11.2f %11.3f %11.2f %11.3f %8.2f %8.2f   %-22s %-22s %-22s" % (
    r["shots_per_class"], r["gradfix_wall_seconds"], r["gradfix_transport_seconds"], r["pytorch_wall_seconds"],
    r["pytorch_transport_seconds"], r["wall_speedup"], r["transport_speedup"],
    "%.2f / %.2f" % (r["gradfix_alpha"], r["pytorch_alpha"]), "%.4f%% / %.4f%%" % (100 * r["gradfix_kept"], 100 * r["pytorch_kept"]),
    "%.2f%% / %.2f%%" % (100 * r["gradfix_test_accuracy"], 100 * r["pytorch_test_accuracy"])))
PY
  rows+="${rows:+,}$row"
done
printf '{"benchmark":"bench_pytorch_transport","task":"%s","cores":%s,"repeat":%s,"rows":[%s]}\n' "$task" "$(nproc)" "$repeat" "$rows" >"$json"
echo "# JSON copy: $json"
