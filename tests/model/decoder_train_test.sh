#!/usr/bin/env bash
# gradfix train on a Hugging Face decoder directory, parameters sharded over 1-3 ranks: one
# full-batch step is Adam's first step on the mean gradient that `signs --sign-mode mean` sums
# (lr * g / (|g| + 1e-8) per entry, computed here from the signs file), minibatch epochs give
# the same bytes at every rank count, the output is a model directory with the input's model files,
# and bad inputs are refused with exit 2 and nothing published.
#   decoder_train_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
model=$repo/tests/fixtures/decoders/llama/model
work=$(mktemp -d /tmp/gradfix-decoder-train-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$repo/tests/support/token_data.py" pool.safetensors 24 8 1

# One step on all 24 samples against Adam's first step computed from the summed -gradients.
"$gradfix" train --weights "$model" --data pool.safetensors --epochs 1 --batch 24 --lr 0.001 --out one >one.log
"$gradfix" signs --weights "$model" --data pool.safetensors --num-samples 24 --sign-mode mean --out mean.safetensors >/dev/null
check "train: one full-batch step is Adam's first step on the mean gradient" python3 - "$repo/tests/support" "$model" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from safetensors_files import f32
base, trained, summed = f32(sys.argv[2]), f32("one"), f32("mean.safetensors")
checked = 0
for name, (shape, s) in summed.items():
    b, w = base[name][1], trained[name][1]
    for i in range(len(s)):
        g = -s[i] / 24.0
        step = -0.001 * g / (abs(g) + 1e-8)
        # B + step rounded to float32: within two of its ulps (|w| <= 1 here).
        assert abs((w[i] - b[i]) - step) <= 1e-7 + 2e-7 * abs(b[i]), (name, i, w[i] - b[i], step)
        checked += 1
assert checked == sum(len(v[1]) for v in base.values()), (checked, len(base))
PY
check "train: the log gives the loss before and after, and the step count" \
  grep -qE "^train: llama, 24 samples, 1 epoch\(s\) of 1 Adam step\(s\) \(batch 24, lr 0.001\), mean loss [0-9.]+ -> [0-9.]+" one.log
check "train: the model directory carries config.json" cmp -s "$model/config.json" one/config.json

# Minibatches with a ragged last batch (24 = 4 x 5 + 4), two epochs: the same bytes at 1-3 ranks,
# and the loss on the data falls.
"$gradfix" train --weights "$model" --data pool.safetensors --epochs 2 --batch 5 --lr 0.003 --seed 4 --out p1 >p1.log
for ranks in 2 3; do
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" train --weights "$model" --data pool.safetensors --epochs 2 --batch 5 --lr 0.003 \
    --seed 4 --out "p$ranks" >/dev/null
  check "train: byte-identical at 1 and $ranks ranks" diff -r p1 "p$ranks"
done
check "train: 10 steps lower the data's mean loss" python3 -c "
import re
before, after = map(float, re.search(r'mean loss ([0-9.]+) -> ([0-9.]+)', open('p1.log').read()).groups())
assert after < before, (before, after)"
"$gradfix" train --weights "$model" --data pool.safetensors --epochs 2 --batch 5 --lr 0.003 --seed 5 --out seed5 >/dev/null
check "train: another seed shuffles the batches differently" bash -c "! cmp -s p1/model.safetensors seed5/model.safetensors"
"$gradfix" train --weights "$model" --data pool.safetensors --skip 4 --limit 10 --epochs 1 --batch 10 --out part >part.log
check "train: --skip and --limit take samples 4-13" grep -q "^train: llama, 10 samples" part.log

# GradFix as fine-tuning's starting point: the transported model trains like any other.
"$gradfix" generate --like "$model" --like-scale 1 --noise 0.01 --seed 5 --out A_ft >/dev/null
"$gradfix" taskvector --base "$model" --finetuned A_ft --out tau.safetensors >/dev/null
"$gradfix" transport --target "$model" --task-vector tau.safetensors --data pool.safetensors --test-data pool.safetensors \
  --num-samples 4 --support-size 8 --alphas 0.5,1 --no-few-shot-baseline --out transported --quiet >/dev/null
"$gradfix" train --weights transported --data pool.safetensors --epochs 1 --batch 8 --out from_gradfix >from_gradfix.log
check "train: a transported model directory trains" grep -q "written to from_gradfix" from_gradfix.log

expect_exit2 "train: --shots-per-class on a model directory" "apply to the built-in classifiers" \
  "$gradfix" train --weights "$model" --data pool.safetensors --shots-per-class 2 --out bad1
expect_exit2 "train: --out as a file" "written as a Hugging Face model directory" \
  "$gradfix" train --weights "$model" --data pool.safetensors --out bad2.safetensors
expect_exit2 "train: --skip past the data" "leaves none of its 24 samples" \
  "$gradfix" train --weights "$model" --data pool.safetensors --skip 24 --out bad3
expect_exit2 "train: image options with token data" "applies to image data" \
  "$gradfix" train --weights "$model" --data pool.safetensors --transform invert --out bad4
check "train: nothing published for the refused runs" bash -c "! ls -d bad1 bad2.safetensors bad3 bad4 2>/dev/null"
check "train: no temporary files left" bash -c "! ls -a | grep -q tmp"
finish
