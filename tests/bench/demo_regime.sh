#!/usr/bin/env bash
# The misaligned regime of issue 9, measured with gradfix's own commands on Debian's
# Fashion-MNIST: two releases A and B of an MLP 784-512-512-10, initialised independently (seeds 1
# and 2) and pre-trained 5 epochs (Adam 1e-3) on disjoint halves of the training set; a downstream
# task given by TRANSFORM (default: Gaussian noise of std 0.5 on the top 14 rows); each release
# fine-tuned on the task with its head frozen (--freeze, Adam 1e-5, 2 epochs: 938 steps of 128), a
# lazy fine-tune as the paper's; then `gradfix transport` of tau_A to B at K = 1, 2, 5 shots per
# class, three seeds of shot selection each, alpha and the few-shot baseline's settings chosen on a
# support set of 200 samples (20 per class) drawn from the same pool, the test set read once.
# Prints a table (mean +- std over the seeds, test accuracy in %) and writes the JSON of every
# transport and the table under WORK. The releases and fine-tunes are cached in WORK.
#   tests/bench/demo_regime.sh [GRADFIX] [WORK] [TRANSFORM] [FREEZE]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=$(realpath "${1:-$root/build/gradfix}")
work=${2:-$root/out/demo-regime}
transform=${3:-noise:0.5:14}
freeze=${4:-^layers\\.2\\.}
data=${GRADFIX_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
mkdir -p "$work"
cd "$work"
g() { "$gradfix" "$@" --quiet >>log.txt; }
start=$(date +%s)
for release in A:1:0 B:2:30000; do
  IFS=: read -r name seed skip <<<"$release"
  [ -f "$name.safetensors" ] && continue
  g init --arch mlp --dims 784,512,512,10 --seed "$seed" --out "$name-init.safetensors"
  g train --weights "$name-init.safetensors" --data "$data:train" --skip "$skip" --limit 30000 --epochs 5 --lr 1e-3 --seed "$seed" \
    --out "$name.safetensors"
done
task=$(printf '%s' "$transform" | tr -c 'A-Za-z0-9.' '_')
for name in A B; do
  [ -f "$name-ft-$task.safetensors" ] && continue
  g train --weights "$name.safetensors" --data "$data:train" --transform "$transform" --freeze "$freeze" --epochs 2 --lr 1e-5 --seed 3 \
    --out "$name-ft-$task.safetensors"
done
g taskvector --base A.safetensors --finetuned "A-ft-$task.safetensors" --out "tau-A-$task.safetensors"
prepared=$(date +%s)
for shots in 1 2 5; do
  for seed in 0 1 2; do
    g transport --target B.safetensors --task-vector "tau-A-$task.safetensors" --target-finetuned "B-ft-$task.safetensors" \
      --data "$data:train" --test-data "$data:t10k" --transform "$transform" --shots-per-class "$shots" --seed "$seed" \
      --support-size 200 --alphas 0.1,0.25,0.5,0.75,1,1.5,2,3,4,5 --results "r-$task-k$shots-s$seed.json"
  done
done
done_at=$(date +%s)
python3 - "$task" "$transform" "$((prepared - start))" "$((done_at - prepared))" <<'PY' | tee "table-$task.md"
import json, math, sys
task, transform, prepare_seconds, transport_seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cells, methods, agreement = {}, [], {}
for k in (1, 2, 5):
    for seed in (0, 1, 2):
        result = json.load(open("r-%s-k%d-s%d.json" % (task, k, seed)))
        for row in result["rows"]:
            if row["method"] not in methods:
                methods.append(row["method"])
            cells.setdefault((row["method"], k), []).append(100 * row["test_accuracy"])
            if row["method"].startswith("GradFix"):
                agreement.setdefault(k, []).append(100 * row["sign_agreement_with_tau_b"])
def cell(values):
    mean = sum(values) / len(values)
    return "%.1f +- %.1f" % (mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
print("transform %s: test accuracy %% (mean +- std over 3 seeds of shots; support 200)" % transform)
print()
print("| method | K=1 | K=2 | K=5 |")
print("|---|---|---|---|")
for method in methods:
    print("| %s | %s |" % (method, " | ".join(cell(cells[(method, k)]) for k in (1, 2, 5))))
print("| sign agreement of the votes with sign(tau_B) | %s |" % " | ".join(cell(agreement[k]) for k in (1, 2, 5)))
print()
print("releases and fine-tunes: %d s (0 when cached); 9 transports: %d s" % (prepare_seconds, transport_seconds))
PY
