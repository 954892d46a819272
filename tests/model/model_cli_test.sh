#!/usr/bin/env bash
# The model subcommands on real data (Debian's Fashion-MNIST): init, train, eval, signs (fast
# path equal to the per-sample loop, equal across 1 and 3 ranks), transport (alpha picks the known
# optimum on a constructed case; the test set plays no part in the choice), bad inputs, and the
# demo's quick configuration.
#   model_cli_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
data=${GRADFIX_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
[ -f "$data/t10k-images-idx3-ubyte.gz" ] || { echo "model_cli_test: no Fashion-MNIST in $data (apt-get install dataset-fashion-mnist)" >&2; exit 1; }
work=$(mktemp -d /tmp/gradfix-model-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
test_set="$data:t10k"
train_set="$data:train"

"$gradfix" init --arch mlp --dims 784,32,10 --seed 1 --out a.safetensors >/dev/null
GRADFIX_PROGRESS_SECONDS=0 "$gradfix" train --weights a.safetensors --data "$train_set" --limit 3000 --epochs 2 --seed 1 \
  --out a_trained.safetensors >train.log 2>train.err
check "training reports its epochs" grep -q "epoch 2/2" train.log
check "training reports progress in samples on stderr, to the last" bash -c "grep -q '^train: 1920/6000 samples (32%)' train.err &&
  tail -1 train.err | grep -q '^train: 6000/6000 samples (100%), .* samples/s, [0-9]*s$' && ! grep -q 'samples (' train.log"
"$gradfix" eval --weights a_trained.safetensors --data "$test_set" >eval.log
accuracy=$(sed -n 's/.*accuracy \([0-9.]*\)%.*/\1/p' eval.log)
check "a trained MLP beats chance clearly on the test set (${accuracy}%)" awk "BEGIN { exit !($accuracy > 50) }"

"$gradfix" signs --weights a_trained.safetensors --data "$test_set" --shots-per-class 6 --seed 3 --out fast.safetensors >/dev/null
"$gradfix" signs --weights a_trained.safetensors --data "$test_set" --shots-per-class 6 --seed 3 --method loop --out loop.safetensors >/dev/null
"$gradfix" inspect fast.safetensors >fast.txt
check "60 votes are stored as int8" grep -q "I8" fast.txt
"$gradfix" inspect fast.safetensors loop.safetensors --json cmp.json >/dev/null
check "fast and loop votes agree on at least 99.99% of entries" python3 -c "
import json; agreement = json.load(open('cmp.json'))['overall']['sign_agreement']
assert agreement >= 0.9999, agreement"
# The same samples given as an indices file give the same votes.
printf '%s\n' 17 3 2000 5 9 > indices.txt
"$gradfix" signs --weights a_trained.safetensors --data "$test_set" --indices indices.txt --out by_indices.safetensors >signs.log
check "an indices file selects exactly its samples" grep -q "signs max: 5 samples" signs.log
"$gradfix" signs --weights a_trained.safetensors --data "$test_set" --num-batches 2 --batch-size 8 --out batches.safetensors >signs.log
check "--num-batches 2 --batch-size 8 takes 16 samples" grep -q "signs max: 16 samples" signs.log
mpirun "${mpirun_flags[@]}" -np 3 "$gradfix" signs --weights a_trained.safetensors --data "$test_set" --shots-per-class 6 --seed 3 \
  --out fast3.safetensors >/dev/null
check "votes from 3 ranks are byte-identical to 1 rank" cmp -s fast.safetensors fast3.safetensors

# The CNN: its fast votes (batched per-sample products of unfolded patches) against the loop.
"$gradfix" init --arch cnn --dims 1,28,28,4,8,10 --seed 1 --out cnn.safetensors >/dev/null
"$gradfix" train --weights cnn.safetensors --data "$train_set" --limit 1000 --seed 1 --out cnn_trained.safetensors >/dev/null
"$gradfix" signs --weights cnn_trained.safetensors --data "$test_set" --shots-per-class 3 --seed 5 --out cnn_fast.safetensors >/dev/null
"$gradfix" signs --weights cnn_trained.safetensors --data "$test_set" --shots-per-class 3 --seed 5 --method loop --out cnn_loop.safetensors >/dev/null
"$gradfix" inspect cnn_fast.safetensors cnn_loop.safetensors --json cnn_cmp.json >/dev/null
check "cnn fast and loop votes agree on at least 99.99% of entries" python3 -c "
import json; agreement = json.load(open('cnn_cmp.json'))['overall']['sign_agreement']
assert agreement >= 0.9999, agreement"
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" signs --weights cnn_trained.safetensors --data "$test_set" --shots-per-class 3 --seed 5 \
  --out cnn_fast2.safetensors >/dev/null
check "cnn votes from 2 ranks are byte-identical to 1 rank" cmp -s cnn_fast.safetensors cnn_fast2.safetensors

# The ViT on real images: trains, and its fast votes agree with the loop.
"$gradfix" init --arch vit --dims 1,28,28,7,16,1,2,32,10 --seed 1 --out vit.safetensors >/dev/null
"$gradfix" train --weights vit.safetensors --data "$train_set" --limit 500 --seed 1 --out vit_trained.safetensors >/dev/null
"$gradfix" signs --weights vit_trained.safetensors --data "$test_set" --shots-per-class 2 --seed 5 --out vit_fast.safetensors >/dev/null
"$gradfix" signs --weights vit_trained.safetensors --data "$test_set" --shots-per-class 2 --seed 5 --method loop --out vit_loop.safetensors >/dev/null
"$gradfix" inspect vit_fast.safetensors vit_loop.safetensors --json vit_cmp.json >/dev/null
# The key third of qkv.bias has a gradient of exactly zero in exact arithmetic (adding a constant
# to every key's score leaves the softmax unchanged): the fast path casts no vote there (its
# per-sample sums cancel to rounding); the loop, taking autograd's gradients as they come, votes
# with the noise. Every other entry must agree.
check "vit fast and loop votes agree on every entry with a non-zero gradient" python3 -c "
import json
for tensor in json.load(open('vit_cmp.json'))['tensors']:
    if tensor['name'].endswith('attn.qkv.bias'):
        assert tensor['sign_agreement'] >= 2 / 3, tensor
    else:
        assert tensor['sign_agreement'] >= 0.9999, tensor"
check "vit: the key third of every qkv.bias casts no vote, the query and value thirds agree with the loop" python3 -c "
import json, struct
def tensors(path):
    raw = open(path, 'rb').read()
    n = struct.unpack('<Q', raw[:8])[0]
    header = json.loads(raw[8:8 + n]); header.pop('__metadata__', None)
    out = {}
    for name, entry in header.items():
        begin, end = entry['data_offsets']
        out[name] = struct.unpack('<%db' % (end - begin), raw[8 + n + begin:8 + n + end])
    return out
fast, loop = tensors('vit_fast.safetensors'), tensors('vit_loop.safetensors')
names = [name for name in fast if name.endswith('attn.qkv.bias')]
assert names
for name in names:
    third = len(fast[name]) // 3
    assert all(v == 0 for v in fast[name][third:2 * third]), (name, fast[name][third:2 * third])
    assert any(v != 0 for v in loop[name][third:2 * third]), name
    assert fast[name][:third] == loop[name][:third] and fast[name][2 * third:] == loop[name][2 * third:], name"

# Transport, constructed: the task vector is tau_B itself, so the naive row must pick alpha = 1
# (B + tau_B = B_ft) and match the fine-tuned model.
"$gradfix" train --weights a_trained.safetensors --data "$train_set" --transform invert --limit 2000 --epochs 2 --seed 2 \
  --out b_ft.safetensors >/dev/null
"$gradfix" taskvector --base a_trained.safetensors --finetuned b_ft.safetensors --out tau_b.safetensors >/dev/null
GRADFIX_PROGRESS_SECONDS=0 "$gradfix" transport --target a_trained.safetensors --task-vector tau_b.safetensors \
  --target-finetuned b_ft.safetensors --data "$train_set" --test-data "$test_set" --transform invert --shots-per-class 2 \
  --support-size 500 --no-few-shot-baseline --results r1.json --out transported.safetensors >transport.log 2>transport.err
check "transport prints every row" grep -q "oracle mask sign(tau_B)" transport.log
# Shots 20 (max mode: two passes), the test set of 10,000 five times (zero-shot, naive, GradFix, oracle,
# upper bound), three searched rows of ten alphas on the support set (500) and the shots (20).
check "transport's progress counts every sample it passes through the model" \
  bash -c "tail -1 transport.err | grep -q '^transport: 65640/65640 samples (100%)'"
"$gradfix" transport --target a_trained.safetensors --task-vector tau_b.safetensors --data "$train_set" --test-data "$test_set" \
  --transform invert --shots-per-class 2 --support-size 500 --alphas 1 --finetune-lrs 1e-3 --finetune-steps 2,4 --quiet >quiet.log 2>quiet.err
check "--quiet: no progress lines" bash -c "! grep -q 'samples (' quiet.err && grep -q 'few-shot fine-tuning of B' quiet.log"
# Fine-tuning from GradFix's model (issue 27): the same search as the few-shot row, started at
# B + alpha * masked tau. At alpha 0 that start is B, so the two rows must be equal; with a
# learning rate of 1e-30 Adam cannot move the start, so the row must score as GradFix's model.
# Each row's compute, counted: 2 alphas x (500 support + 20 shots) forward for a searched row,
# GradFix's votes one pass of the 20 shots more, fine-tuning 4 steps of 20 shots and 2 scores of
# the support set, and from GradFix both.
ft_args=(--target a_trained.safetensors --task-vector tau_b.safetensors --data "$train_set" --test-data "$test_set"
  --transform invert --shots-per-class 2 --support-size 500 --finetune-steps 2,4 --quiet)
"$gradfix" transport "${ft_args[@]}" --alphas 0,0 --finetune-lrs 1e-3 --results ft-alpha0.json >ft-alpha0.log
"$gradfix" transport "${ft_args[@]}" --alphas 0.5,1 --finetune-lrs 1e-30 --results ft-still.json >ft-still.log
"$gradfix" transport "${ft_args[@]}" --alphas 0.5,1 --finetune-lrs 1e-3 --no-gradfix-finetune --results ft-none.json >ft-none.log
check "fine-tuning from GradFix: the row is printed" grep -q "^GradFix + few-shot fine-tuning  " ft-alpha0.log
check "fine-tuning from GradFix: equal to fine-tuning B at alpha 0, GradFix's model at a still learning rate, compute counted" python3 -c "
import json
def rows(name): return {r['method']: r for r in json.load(open(name))['rows']}
zero, still, none = rows('ft-alpha0.json'), rows('ft-still.json'), rows('ft-none.json')
a, b = zero['GradFix + few-shot fine-tuning'], zero['few-shot fine-tuning of B']
assert (a['test_accuracy'], a['test_loss']) == (b['test_accuracy'], b['test_loss']), (a, b)
a, g = still['GradFix + few-shot fine-tuning'], still['GradFix (max, normal)']
assert a['test_accuracy'] == g['test_accuracy'] and abs(a['test_loss'] - g['test_loss']) <= 1e-6 * abs(g['test_loss']), (a, g)
compute = {m: (r['forward_samples'], r['backward_samples']) for m, r in still.items() if 'forward_samples' in r}
assert compute == {'B zero-shot': (0, 0), 'B + alpha tau_A (naive)': (1040, 0), 'GradFix (max, normal)': (1060, 20),
                   'few-shot fine-tuning of B': (1080, 80), 'GradFix + few-shot fine-tuning': (2140, 100)}, compute
assert 'GradFix + few-shot fine-tuning' not in none and 'few-shot fine-tuning of B' in none, list(none)"

# --finetune-freeze: the few-shot row leaves the head out of Adam. Both rows run the same
# deterministic steps on the same shots, so they could only agree exactly if the freeze did nothing.
"$gradfix" transport --target a_trained.safetensors --task-vector tau_b.safetensors --data "$train_set" --test-data "$test_set" \
  --transform invert --shots-per-class 2 --support-size 500 --alphas 1 --finetune-lrs 1e-2 --finetune-steps 5 \
  --finetune-freeze '^layers\.1\.' --save-indices frozen-shots.txt --save-support frozen-support.txt --results frozen.json --quiet >frozen.log
"$gradfix" transport --target a_trained.safetensors --task-vector tau_b.safetensors --data "$train_set" --test-data "$test_set" \
  --transform invert --shots-per-class 2 --support-size 500 --alphas 1 --finetune-lrs 1e-2 --finetune-steps 5 \
  --results unfrozen.json --quiet >/dev/null
check "--save-support: 500 support samples, 20 shots, disjoint, in the pool" python3 -c "
shots = [int(x) for x in open('frozen-shots.txt')]; support = [int(x) for x in open('frozen-support.txt')]
assert len(shots) == 20 and len(support) == 500 and len(set(support)) == 500 and not set(shots) & set(support), (len(shots), len(support))
assert all(0 <= i < 60000 for i in support)"
check "--finetune-freeze: the row names the frozen pattern" grep -qF 'few-shot fine-tuning of B (frozen: ^layers\.1\.)' frozen.log
check "--finetune-freeze: the frozen head changes the few-shot row, nothing else" python3 -c "
import json
frozen = {r['method']: r for r in json.load(open('frozen.json'))['rows']}
plain = {r['method']: r for r in json.load(open('unfrozen.json'))['rows']}
assert frozen['few-shot fine-tuning of B (frozen: ^layers\\\\.1\\\\.)']['test_accuracy'] != plain['few-shot fine-tuning of B']['test_accuracy']
for method in ('B zero-shot', 'B + alpha tau_A (naive)', 'GradFix (max, normal)'):
    assert frozen[method] == plain[method], method"
check "naive alpha is 1.0 when tau_A = tau_B" python3 -c "
import json; rows = {r['method']: r for r in json.load(open('r1.json'))['rows']}
naive = rows['B + alpha tau_A (naive)']; upper = rows['B fine-tuned (upper bound)']
assert naive['alpha'] == 1.0, naive
assert abs(naive['test_accuracy'] - upper['test_accuracy']) < 1e-9, (naive, upper)"
check "the transported model is written" test -s transported.safetensors
# The same run against another test set chooses the same alphas: the test set is never read
# before the final evaluation.
"$gradfix" transport --target a_trained.safetensors --task-vector tau_b.safetensors --target-finetuned b_ft.safetensors \
  --data "$train_set" --test-data "$train_set" --transform invert --shots-per-class 2 --support-size 500 \
  --no-few-shot-baseline --results r2.json >/dev/null
check "alphas do not depend on the test set" python3 -c "
import json; a = [r['alpha'] for r in json.load(open('r1.json'))['rows']]; b = [r['alpha'] for r in json.load(open('r2.json'))['rows']]
assert a == b, (a, b)"

# --freeze: the head (layers.1.*) keeps its bytes, the rest trains; a shifted task (rotate:30 and
# a blur) gives the training other data than the plain one.
"$gradfix" train --weights a_trained.safetensors --data "$train_set" --transform rotate:30+blur:0.8 --limit 500 --lr 1e-3 --seed 4 \
  --freeze '^layers\.1\.' --out frozen.safetensors >freeze.log
"$gradfix" train --weights a_trained.safetensors --data "$train_set" --limit 500 --lr 1e-3 --seed 4 --freeze '^layers\.1\.' \
  --out plain.safetensors >/dev/null
for file in a_trained frozen plain; do
  "$gradfix" convert "$file.safetensors" "$file-head.safetensors" --include '^layers\.1\.' >/dev/null
  "$gradfix" convert "$file.safetensors" "$file-body.safetensors" --include '^layers\.0\.' >/dev/null
done
check "--freeze: the head keeps its bytes" "$repo/tests/support/same_tensors.py" a_trained-head.safetensors frozen-head.safetensors
check "--freeze: the rest trains" bash -c "! '$repo/tests/support/same_tensors.py' a_trained-body.safetensors frozen-body.safetensors 2>/dev/null"
check "--freeze: the log names the frozen tensors" grep -q "2 tensor(s) frozen: 'layers.1.bias', 'layers.1.weight'" freeze.log
check "--transform rotate:30+blur:0.8 trains on other inputs than none" \
  bash -c "! '$repo/tests/support/same_tensors.py' plain-body.safetensors frozen-body.safetensors 2>/dev/null"

# The first-order descent guarantee, reported: in mean mode with the normal mask, <g, d> equals
# what the signs (on the same shots, saved by transport) and mask files give, and is <= 0.
"$gradfix" transport --target a_trained.safetensors --task-vector tau_b.safetensors --data "$train_set" --test-data "$test_set" \
  --transform invert --shots-per-class 2 --support-size 200 --sign-mode mean --no-few-shot-baseline --save-indices shots.txt \
  --results rm.json >/dev/null
"$gradfix" signs --weights a_trained.safetensors --data "$train_set" --transform invert --indices shots.txt --sign-mode mean \
  --out sums.safetensors >/dev/null
"$gradfix" mask --task-vector tau_b.safetensors --signs sums.safetensors --out masked_mean.safetensors >/dev/null
check "classifier transport: <g, d> of the files, <= 0, -sum |g||tau| over the kept entries" \
  "$repo/tests/support/directional_derivative.py" rm.json sums.safetensors masked_mean.safetensors tau_b.safetensors 20

expect_bad() {  # expect_bad MESSAGE ARGS...
  local message=$1
  shift
  set +e
  "$gradfix" "$@" >out.txt 2>err.txt
  local code=$?
  set -e
  check "exit 2 and '$message' for: $*" test "$code" -eq 2 -a -n "$(grep -F -- "$message" err.txt)"
}
"$gradfix" init --dims 784,16,5 --out five.safetensors >/dev/null
"$gradfix" init --dims 100,10 --out small.safetensors >/dev/null
expect_bad "labels go up to 9 but the model has 5 classes" eval --weights five.safetensors --data "$test_set"
expect_bad "do not fit the model's input of 100 values" eval --weights small.safetensors --data "$test_set"
expect_bad "fewer than the 2000 shots per class" signs --weights a_trained.safetensors --data "$test_set" --shots-per-class 2000 --out s.safetensors
expect_bad "unknown architecture 'resnet'" init --arch resnet --dims 1,2 --out r.safetensors
expect_bad "unknown --transform 'blur'" eval --weights a_trained.safetensors --data "$test_set" --transform blur
expect_bad "blur takes a number in [0.1, 10] (pixels)" eval --weights a_trained.safetensors --data "$test_set" --transform rotate:30+blur:0
expect_bad "freeze 'head' matches no tensor of a_trained.safetensors (its tensors: 'layers.0.weight'" \
  train --weights a_trained.safetensors --data "$train_set" --limit 100 --freeze head --out f.safetensors
expect_bad "freeze leaves nothing to train: it matches all 4 tensors" \
  train --weights a_trained.safetensors --data "$train_set" --limit 100 --freeze layers --out f.safetensors
expect_bad "finetune-freeze leaves nothing to train: it matches all 4 tensors of a_trained.safetensors" \
  transport --target a_trained.safetensors --task-vector tau_b.safetensors --data "$train_set" --test-data "$test_set" --finetune-freeze layers
expect_bad "finetune-freeze 'head' matches no tensor of a_trained.safetensors" \
  transport --target a_trained.safetensors --task-vector tau_b.safetensors --data "$train_set" --test-data "$test_set" --finetune-freeze head
expect_bad "finetune-freeze configures the few-shot fine-tuning row, which --no-few-shot-baseline skips" \
  transport --target a_trained.safetensors --task-vector tau_b.safetensors --data "$train_set" --test-data "$test_set" \
  --finetune-freeze layers --no-few-shot-baseline
expect_bad "unknown --device 'tpu'" eval --weights a_trained.safetensors --data "$test_set" --device tpu
if ! "$gradfix" eval --weights a_trained.safetensors --data "$test_set" --device cuda >/dev/null 2>&1; then
  # No GPU here: asking for one is an error that says so, never a quiet run on the CPU.
  expect_bad "no CUDA device is usable here" eval --weights a_trained.safetensors --data "$test_set" --device cuda
fi
"$gradfix" generate --shapes w=3x3 --out bare.safetensors >/dev/null
expect_bad "no gradfix.arch" eval --weights bare.safetensors --data "$test_set"
check "no output left by the failed signs" test ! -e s.safetensors

"$gradfix" demo --quick --cache demo-cache --results demo.json >demo.log
check "the quick demo prints the GradFix and baseline rows" grep -q "few-shot fine-tuning of B" demo.log
check "the quick demo writes its results" test -s demo.json
check "the quick demo: four tasks, every method per task and K, the mask modes and the merges" python3 - <<'PY'
import json
demo = json.load(open("demo.json"))
tasks = demo["tasks"]
assert tasks == ["noise:0.5:14", "rotate:20", "contrast:0.5", "blur:3"], tasks
assert {(r["task"], r["method"]) for r in demo["rows"]} >= {(t, "GradFix (max, normal)") for t in tasks}
assert len(demo["mask_modes"]) == 10 * 4, len(demo["mask_modes"])
assert {m["mask_mode"] for m in demo["mask_modes"]} >= {"normal", "random", "random_same_kept"}
# The few-shot baseline twice (every tensor tuned; the head frozen, as the paper's), the main
# table at the quick support set (300) and the small-support table (50), both at K = 2.
rows = demo["rows"]
assert {r["support_size"] for r in rows} == {300, 50}, {r["support_size"] for r in rows}
for size in (300, 50):
    methods = {r["method"] for r in rows if r["support_size"] == size}
    assert {"few-shot fine-tuning of B", "few-shot fine-tuning of B (head frozen)", "GradFix (max, normal)",
            "GradFix + few-shot fine-tuning", "GradFix + few-shot fine-tuning (head frozen)"} <= methods, methods
    assert all(r["forward_samples_mean"] > 0 for r in rows if r["support_size"] == size and "fine-tuning" in r["method"])
def accuracy(task, method, size=300):
    return [r["test_accuracy_mean"] for r in rows if r["task"] == task and r["method"] == method and r["support_size"] == size]
assert any(accuracy(t, "few-shot fine-tuning of B") != accuracy(t, "few-shot fine-tuning of B (head frozen)") for t in tasks)
gradfix_rows = [r for r in rows if r["method"] == "GradFix (max, normal)"]
assert all(0 < r["kept_mean"] < 1 and 0 <= r["sign_agreement_mean"] <= 1 and len(r["alpha_curve_mean"]) == 10 for r in gradfix_rows)
merges = {m["merge"] for m in demo["merging"]}
assert len(demo["merging"]) == 8 * 4 and "GradFix merge-then-mask, ties" in merges, merges
assert all(0 <= m["normalized_accuracy_mean"] < 2 for m in demo["merging"])
# The ablation's normal-mask GradFix is the main table's GradFix row at the same K (one seed).
for t in tasks:
    main = accuracy(t, "GradFix (max, normal)")
    normal = [m["gradfix_test_accuracy_mean"] for m in demo["mask_modes"] if m["task"] == t and m["mask_mode"] == "normal"]
    assert main == normal, (t, main, normal)
PY
# launch/plot draws the demo's JSON: every plot, the mask modes and merges by name, and the same
# bytes from the same results (no dates or random ids in the files).
"$repo/launch/plot" demo.json --out plots >plot.log
for name in accuracy_vs_shots accuracy_vs_compute accuracy_by_task sign_agreement accuracy_vs_alpha alpha_curves mask_modes merging; do
  check "launch/plot of the demo: $name.png is a PNG" bash -c "head -c 4 plots/$name.png | od -An -tx1 | grep -q '89 50 4e 47'"
  check "launch/plot of the demo: $name.svg is an SVG" grep -q "<svg" "plots/$name.svg"
done
check "launch/plot of the demo: the random control among the mask modes" grep -q "random_same_kept" plots/mask_modes.svg
check "launch/plot of the demo: the merges by name" grep -q "GradFix merge-then-mask, ties" plots/merging.svg
check "launch/plot of the demo: both few-shot rows" grep -q "few-shot fine-tuning of B (head frozen)" plots/accuracy_vs_shots.svg
"$repo/launch/plot" demo.json --out plots-again >/dev/null
check "launch/plot of the demo: the same SVG bytes twice" cmp plots/merging.svg plots-again/merging.svg
echo '{"rows": []}' >not-demo.json
set +e
"$repo/launch/plot" not-demo.json >plot-bad.log 2>&1
code=$?
set -e
check "launch/plot of a JSON that is not the demo's: exit 2, named" test "$code" -eq 2 -a -n "$(grep -F 'not-demo.json: not the results of' plot-bad.log)"
finish
