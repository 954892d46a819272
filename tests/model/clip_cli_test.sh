#!/usr/bin/env bash
# gradfix eval and signs on a Hugging Face CLIP directory (the transformers fixture in
# tests/fixtures/clip, a zero-shot head, preprocessed images): per-sample losses equal
# transformers' within 1e-4, votes equal its float64 per-sample loop (the key biases, whose
# gradient is zero in theory, cast none), fast and loop methods alike, results and vote files
# byte-identical at 1-4 ranks, 8-bit images normalised exactly as by hand, the sharded few-shot
# fine-tuning equal to torch.optim.Adam, and bad inputs refused with exit 2 naming what is wrong.
#   clip_cli_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/clip
work=$(mktemp -d /tmp/gradfix-clip-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

expect_bad() {  # expect_bad DESCRIPTION PATTERN ARGS...
  local description=$1 pattern=$2
  shift 2
  expect_exit2 "$description" "$pattern" "$gradfix" "$@"
  check "$description: nothing written" test ! -e bad.json -a ! -e bad.safetensors
}

# The reference (F64 losses, I8 votes, F32 margins) with Python's standard library only.
reference() {  # reference KEY [FILE]
  python3 - "${2:-$fixtures/reference.safetensors}" "$1" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
entry = json.loads(raw[8:8 + n])[sys.argv[2]]
begin, end = entry["data_offsets"]
print(json.dumps(list(struct.unpack("<%dd" % ((end - begin) // 8), raw[8 + n + begin:8 + n + end]))))
PY
}

"$gradfix" convert "$fixtures/images.safetensors" images.h5 >/dev/null
clip=(--weights "$fixtures/model" --head "$fixtures/head.safetensors" --data images.h5)
"$gradfix" eval "${clip[@]}" --results eval1.json >eval.log
check "eval names the model" grep -q "eval: clip vision tower, 6 images, 5 classes" eval.log
expected=$(reference per_sample_loss)
check "per-sample losses equal transformers' within 1e-4" python3 -c "
import json
got = json.load(open('eval1.json'))['per_sample_loss']; want = json.loads('$expected')
assert len(got) == len(want) == 6, (got, want)
assert all(abs(g - w) <= 1e-4 * abs(w) + 1e-6 for g, w in zip(got, want)), (got, want)"

compare_votes() {  # compare_votes VOTES [MARGIN]: against the reference where its margin is >= MARGIN (1e-4), the key biases aside
  python3 - "$1" "$fixtures/reference.safetensors" "${2:-1e-4}" <<'PY'
import json, struct, sys
def tensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n]); header.pop("__metadata__", None)
    formats = {"I8": "b", "F32": "f", "F64": "d"}
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        code = formats[entry["dtype"]]
        out[name] = struct.unpack("<%d%s" % ((end - begin) // struct.calcsize(code), code), raw[8 + n + begin:8 + n + end])
    return out
votes, reference = tensors(sys.argv[1]), tensors(sys.argv[2])
names = [k[len("votes."):] for k in reference if k.startswith("votes.")]
assert sorted(names) == sorted(votes), (sorted(names), sorted(votes))
differ = 0
for name in names:
    if name.endswith("self_attn.k_proj.bias"):
        # Zero in theory: every query's scores shift alike. No votes, whatever the reference's noise.
        assert all(v == 0 for v in votes[name]), (name, votes[name])
        continue
    differ += sum(1 for v, r, m in zip(votes[name], reference["votes." + name], reference["margin." + name]) if v != r and m >= float(sys.argv[3]))
nonzero = sum(1 for name in names for v in votes[name] if v != 0)
print(differ, nonzero)
sys.exit(0 if differ == 0 and nonzero > 0 else 1)
PY
}
"$gradfix" signs "${clip[@]}" --num-samples 6 --out votes1.safetensors >signs.log
check "signs stores 6 votes per entry as I8 for the 40 tensors of the vision tower" grep -q "clip vision tower, 6 images, 40 tensors as I8" signs.log
check "votes equal transformers' per-sample reference (key biases: none)" compare_votes votes1.safetensors
"$gradfix" signs "${clip[@]}" --num-samples 6 --method loop --out loop.safetensors >/dev/null
check "the loop method (one backward per sample) gives the same votes" cmp -s votes1.safetensors loop.safetensors
for ranks in 2 3 4; do
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" signs "${clip[@]}" --num-samples 6 --out "votes$ranks.safetensors" >/dev/null
  check "votes byte-identical at 1 and $ranks ranks" cmp -s votes1.safetensors "votes$ranks.safetensors"
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" eval "${clip[@]}" --results "eval$ranks.json" >/dev/null
  check "eval results byte-identical at 1 and $ranks ranks" cmp -s eval1.json "eval$ranks.json"
done
# --vote-precision bf16 (the decoders' test says more): equal to the reference where its margin is
# >= 0.02, the same bytes at 1 and 2 ranks.
"$gradfix" signs "${clip[@]}" --num-samples 6 --vote-precision bf16 --out bf16_1.safetensors >signs.log
check "bf16 votes are said" grep -q "signs max (bf16 products): clip vision tower, 6 images" signs.log
check "bf16 votes equal transformers' reference where its margin is >= 0.02" compare_votes bf16_1.safetensors 0.02
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" signs "${clip[@]}" --num-samples 6 --vote-precision bf16 --out bf16_2.safetensors >/dev/null
check "bf16 votes byte-identical at 1 and 2 ranks" cmp -s bf16_1.safetensors bf16_2.safetensors
"$gradfix" signs "${clip[@]}" --num-samples 3 --seed 2 --sign-mode mean --out mean.safetensors >mean.log
check "mean mode on 3 shots of a seeded shuffle" grep -q "signs mean: clip vision tower, 3 images, 40 tensors as F32" mean.log
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" signs "${clip[@]}" --num-samples 3 --seed 2 --sign-mode mean --out mean2.safetensors >/dev/null
check "mean sums byte-identical at 1 and 2 ranks" cmp -s mean.safetensors mean2.safetensors
# The votes feed mask and apply under the checkpoint's names; the text tower is copied unchanged.
"$gradfix" generate --like "$fixtures/model" --like-scale 1 --noise 0.01 --seed 5 --out clip_ft >/dev/null
"$gradfix" taskvector --base "$fixtures/model" --finetuned clip_ft --include '^vision_model\.|^visual_projection' --out tau.safetensors >/dev/null
"$gradfix" mask --task-vector tau.safetensors --signs votes1.safetensors --out masked.safetensors >mask.log
check "mask takes the CLIP votes: 40 tensors" grep -q "mask normal: 40 tensors" mask.log
"$gradfix" apply --base "$fixtures/model" --task-vector masked.safetensors --alpha 0.5 --out transported >/dev/null
check "the transported CLIP directory carries config.json" cmp -s "$fixtures/model/config.json" transported/config.json
"$gradfix" eval --weights transported --head "$fixtures/head.safetensors" --data images.h5 --results transported.json >/dev/null
check "the transported directory is a CLIP model gradfix evaluates" test -s transported.json

# transport with the parameters sharded: the transported directory and the results are the same at
# 1-3 ranks, the directory is signs -> mask -> apply at the chosen alpha (text tower copied), and
# the zero-shot row is eval of B.
python3 - <<'PY'
import json, random, struct
def write(path, n, seed):
    rng = random.Random(seed)
    pixels = [rng.gauss(0, 1) for _ in range(n * 3 * 16 * 16)]
    labels = [i % 5 for i in range(n)]
    size = 4 * len(pixels)
    header = {"inputs": {"dtype": "F32", "shape": [n, 3, 16, 16], "data_offsets": [0, size]},
              "labels": {"dtype": "I64", "shape": [n], "data_offsets": [size, size + 8 * n]}}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + struct.pack("<%df" % len(pixels), *pixels) + struct.pack("<%dq" % n, *labels))
write("pool.safetensors", 30, 1)
write("test.safetensors", 10, 2)
PY
"$gradfix" convert pool.safetensors pool.h5 >/dev/null
"$gradfix" convert test.safetensors test.h5 >/dev/null
"$gradfix" generate --like "$fixtures/model" --like-scale 1 --noise 0.02 --seed 6 --out clip_b_ft >/dev/null
transport=(transport --target "$fixtures/model" --head "$fixtures/head.safetensors" --task-vector tau.safetensors --target-finetuned clip_b_ft
           --data pool.h5 --test-data test.h5 --shots-per-class 2 --seed 4 --support-size 10 --alphas 0.5,1,2)
"$gradfix" "${transport[@]}" --out T1 --results R1.json >transport.log
check "CLIP transport prints the rows" bash -c "grep -q 'GradFix (max, normal)' transport.log && grep -q 'oracle mask' transport.log"
for ranks in 2 3; do
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" "${transport[@]}" --out "T$ranks" --results "R$ranks.json" >/dev/null
  check "CLIP transported directory byte-identical at 1 and $ranks ranks" diff -r T1 "T$ranks"
  check "CLIP transport results byte-identical at 1 and $ranks ranks" cmp -s R1.json "R$ranks.json"
done
alpha=$(python3 -c "import json; print([r for r in json.load(open('R1.json'))['rows'] if r['method'].startswith('GradFix')][0]['alpha'])")
"$gradfix" signs --weights "$fixtures/model" --head "$fixtures/head.safetensors" --data pool.h5 --shots-per-class 2 --seed 4 --out pool_votes.safetensors >/dev/null
"$gradfix" mask --task-vector tau.safetensors --signs pool_votes.safetensors --out pool_masked.safetensors >/dev/null
"$gradfix" apply --base "$fixtures/model" --task-vector pool_masked.safetensors --alpha "$alpha" --out steps >/dev/null
check "CLIP transport writes exactly signs -> mask -> apply at alpha $alpha, the text tower included" \
  "$repo/tests/support/same_tensors.py" T1 steps --require-prefix text_model.
"$gradfix" eval --weights "$fixtures/model" --head "$fixtures/head.safetensors" --data test.h5 --results zero.json >/dev/null
check "the CLIP zero-shot row is eval of B on the test set" python3 -c "
import json
rows = {r['method']: r for r in json.load(open('R1.json'))['rows']}
zero = json.load(open('zero.json'))
assert rows['B zero-shot']['test_loss'] == zero['mean_loss'] and rows['B zero-shot']['test_accuracy'] == zero['accuracy'], rows"

# The first-order descent guarantee, reported: in mean mode with the normal mask, <g, d> of the
# GradFix update equals what the signs and mask files give and is -sum |g| |tau| over the kept
# entries (<= 0); at 2 ranks the same. In max mode it is reported whatever its sign.
"$gradfix" signs --weights "$fixtures/model" --head "$fixtures/head.safetensors" --data pool.h5 --shots-per-class 2 --seed 4 \
  --sign-mode mean --out pool_sums.safetensors >/dev/null
"$gradfix" mask --task-vector tau.safetensors --signs pool_sums.safetensors --out pool_masked_mean.safetensors >/dev/null
for ranks in 1 2; do
  mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" "${transport[@]}" --sign-mode mean --no-few-shot-baseline --results "RM$ranks.json" >/dev/null
  check "CLIP transport at $ranks rank(s): <g, d> of the files, <= 0, -sum |g||tau| over the kept entries" \
    "$repo/tests/support/directional_derivative.py" "RM$ranks.json" pool_sums.safetensors pool_masked_mean.safetensors tau.safetensors 10
done
check "max mode reports <g, d> and the shots' loss along the alpha grid" python3 -c "
import json, math
r = json.load(open('R1.json'))
assert math.isfinite(r['directional_derivative']) and math.isfinite(r['naive_directional_derivative']), r
rows = {x['method']: x for x in r['rows']}
curve = rows['GradFix (max, normal)']['alpha_curve']
assert [p['alpha'] for p in curve] == [0.5, 1, 2] and all(math.isfinite(p['shots_loss']) for p in curve), curve
assert 'directional_derivative' not in rows['B zero-shot'], rows['B zero-shot']"

# Few-shot fine-tuning with the parameters sharded (transport's "few-shot fine-tuning of B" row):
# full-batch Adam on images 0-2 equals torch.optim.Adam in float64
# (make_finetune_reference.py) after 1 and after 3 steps, at 1 and 2 ranks, and the
# (learning rate, steps) chosen is the one with the lowest support loss.
printf '0\n1\n2\n' >shots.txt
for steps in 1 3; do
  expected=$(reference "losses_after_$steps" "$fixtures/finetune_reference.safetensors")
  for ranks in 1 2; do
    mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" transport --target "$fixtures/model" --head "$fixtures/head.safetensors" \
      --task-vector tau.safetensors --data images.h5 --test-data images.h5 --indices shots.txt --support-size 3 --alphas 1 \
      --finetune-lrs 0.001 --finetune-steps "$steps" --results "ft$steps-$ranks.json" >/dev/null
    check "few-shot fine-tuning, $steps Adam step(s) at $ranks rank(s), equals torch.optim.Adam within 1e-5" python3 -c "
import json, sys
expected = json.loads(sys.argv[1])
result = json.load(open('ft$steps-$ranks.json'))
row = [r for r in result['rows'] if r['method'] == 'few-shot fine-tuning of B'][0]
want = sum(expected) / len(expected)
assert abs(row['test_loss'] - want) <= 1e-5 * max(1.0, abs(want)), (row['test_loss'], want)
assert result['few_shot_finetuning']['steps'] == $steps and result['few_shot_finetuning']['learning_rate'] == 0.001, result
" "$expected"
  done
done
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" transport --target "$fixtures/model" --head "$fixtures/head.safetensors" \
  --task-vector tau.safetensors --data images.h5 --test-data images.h5 --indices shots.txt --support-size 3 --alphas 1 \
  --finetune-lrs 0.001,1e-9 --finetune-steps 1,3 --results ft-grid.json >/dev/null
check "few-shot fine-tuning picks the grid point of lowest support loss (3 steps at 1e-3 over 1e-9)" python3 -c "
import json
chosen = json.load(open('ft-grid.json'))['few_shot_finetuning']
assert chosen['learning_rate'] == 0.001 and chosen['steps'] == 3, chosen"

# Fine-tuning from GradFix's model with the parameters sharded (issue 27): at alpha 0 it starts
# at B and equals the few-shot row; at a learning rate of 1e-30 it stays at GradFix's model. Each
# row's compute: 1 alpha x (3 support + 3 shots) forward per search, the votes one pass of the 3
# shots, fine-tuning 3 steps of 3 shots and 2 scores of the 3 support images.
for case in "0 0.001" "1 1e-30"; do
  read -r alpha lr <<<"$case"
  mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" transport --target "$fixtures/model" --head "$fixtures/head.safetensors" \
    --task-vector tau.safetensors --data images.h5 --test-data images.h5 --indices shots.txt --support-size 3 --alphas "$alpha" \
    --finetune-lrs "$lr" --finetune-steps 1,3 --results "ft-from-gradfix-$alpha.json" >/dev/null
done
check "fine-tuning from GradFix at 2 ranks: B's row at alpha 0, GradFix's model at a still learning rate, compute counted" python3 -c "
import json
def rows(name): return {r['method']: r for r in json.load(open(name))['rows']}
zero, still = rows('ft-from-gradfix-0.json'), rows('ft-from-gradfix-1.json')
a, b = zero['GradFix + few-shot fine-tuning'], zero['few-shot fine-tuning of B']
assert (a['test_accuracy'], a['test_loss']) == (b['test_accuracy'], b['test_loss']), (a, b)
a, g = still['GradFix + few-shot fine-tuning'], still['GradFix (max, normal)']
assert abs(a['test_loss'] - g['test_loss']) <= 1e-6 * abs(g['test_loss']), (a, g)
compute = {m: (r['forward_samples'], r['backward_samples']) for m, r in still.items() if 'forward_samples' in r}
assert compute == {'B zero-shot': (0, 0), 'B + alpha tau_A (naive)': (6, 0), 'GradFix (max, normal)': (9, 3),
                   'few-shot fine-tuning of B': (15, 9), 'GradFix + few-shot fine-tuning': (24, 12)}, compute
assert json.load(open('ft-from-gradfix-1.json'))['gradfix_finetuning']['learning_rate'] == 1e-30"
expect_bad "a learning rate of zero" "every learning rate must be positive" transport --target "$fixtures/model" \
  --head "$fixtures/head.safetensors" --task-vector tau.safetensors --data images.h5 --test-data images.h5 --finetune-lrs 0 --results bad.json
expect_bad "step counts that decrease" "--finetune-steps must increase, got 2 after 5" transport --target "$fixtures/model" \
  --head "$fixtures/head.safetensors" --task-vector tau.safetensors --data images.h5 --test-data images.h5 --finetune-steps 5,2 --results bad.json

# 8-bit images [N, H, W, 3]: gradfix normalises them itself (no resize at the model's size), so
# eval equals eval of the same images normalised by hand in float32.
python3 - <<'PY'
import json, struct
mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
n = 6
pixels = [(i * 37 + y * 11 + x * 5 + c * 101) % 256 for i in range(n) for y in range(16) for x in range(16) for c in range(3)]
floats = [(pixels[((i * 16 + y) * 16 + x) * 3 + c] / 255.0 - mean[c]) / std[c] for i in range(n) for c in range(3) for y in range(16) for x in range(16)]
labels = [i % 5 for i in range(n)]
def write(path, dtype, shape, data, fmt):
    size = struct.calcsize("<%d%s" % (len(data), fmt))
    header = {"inputs": {"dtype": dtype, "shape": shape, "data_offsets": [0, size]},
              "labels": {"dtype": "I64", "shape": [n], "data_offsets": [size, size + 8 * n]}}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + struct.pack("<%d%s" % (len(data), fmt), *data) + struct.pack("<%dq" % n, *labels))
write("bytes.safetensors", "U8", [n, 16, 16, 3], pixels, "B")
write("normalised.safetensors", "F32", [n, 3, 16, 16], floats, "f")
PY
"$gradfix" convert bytes.safetensors bytes.h5 >/dev/null
"$gradfix" convert normalised.safetensors normalised.h5 >/dev/null
"$gradfix" eval --weights "$fixtures/model" --head "$fixtures/head.safetensors" --data bytes.h5 --results bytes.json >/dev/null
"$gradfix" eval --weights "$fixtures/model" --head "$fixtures/head.safetensors" --data normalised.h5 --results normalised.json >/dev/null
check "eval of 8-bit images equals eval of the same images normalised by hand (1e-5)" python3 -c "
import json
a, b = json.load(open('bytes.json'))['per_sample_loss'], json.load(open('normalised.json'))['per_sample_loss']
assert len(a) == 6 and all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b)), (a, b)"
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" eval --weights "$fixtures/model" --head "$fixtures/head.safetensors" --data bytes.h5 --results bytes2.json >/dev/null
check "eval of 8-bit images byte-identical at 1 and 2 ranks" cmp -s bytes.json bytes2.json
python3 -c "
import json, struct
header = {'inputs': {'dtype': 'U8', 'shape': [2, 3, 16, 16], 'data_offsets': [0, 1536]}, 'labels': {'dtype': 'I64', 'shape': [2], 'data_offsets': [1536, 1552]}}
text = json.dumps(header).encode(); text += b' ' * ((8 - len(text) % 8) % 8)
open('chw_bytes.safetensors', 'wb').write(struct.pack('<Q', len(text)) + text + bytes(1552))"
"$gradfix" convert chw_bytes.safetensors chw_bytes.h5 >/dev/null
expect_bad "8-bit images channels first" "8-bit images of shape \[3, 16, 16\] but the model takes \[height, width, 3\] pixels" \
  eval --weights "$fixtures/model" --head "$fixtures/head.safetensors" --data chw_bytes.h5 --results bad.json
cp -r "$fixtures/model" wrong_crop && echo '{"crop_size": 224, "size": 224}' >wrong_crop/preprocessor_config.json
expect_bad "a preprocessor config whose crop is not the model's size" "\"crop_size\" is 224 but the model's image_size is 16" \
  eval --weights wrong_crop --head "$fixtures/head.safetensors" --data bytes.h5 --results bad.json

# Bad inputs.
expect_bad "no head" "give its zero-shot head with --head FILE" eval --weights "$fixtures/model" --data images.h5 --results bad.json
python3 -c "
import json, struct
header = {'head': {'dtype': 'F32', 'shape': [5, 7], 'data_offsets': [0, 140]}}
text = json.dumps(header).encode(); text += b' ' * ((8 - len(text) % 8) % 8)
open('narrow_head.safetensors', 'wb').write(struct.pack('<Q', len(text)) + text + struct.pack('<35f', *([0.5] * 35)))"
expect_bad "a head of the wrong width" "the head 'head' is \[5, 7\], the model needs \[classes, 24\]" \
  eval --weights "$fixtures/model" --head narrow_head.safetensors --data images.h5 --results bad.json
python3 -c "
import json, struct
header = {'inputs': {'dtype': 'F32', 'shape': [2, 3, 8, 8], 'data_offsets': [0, 1536]}, 'labels': {'dtype': 'I64', 'shape': [2], 'data_offsets': [1536, 1552]}}
text = json.dumps(header).encode(); text += b' ' * ((8 - len(text) % 8) % 8)
open('small.safetensors', 'wb').write(struct.pack('<Q', len(text)) + text + bytes(1552))"
"$gradfix" convert small.safetensors small.h5 >/dev/null
expect_bad "images of the wrong size" "images of shape \[3, 8, 8\] but the model takes \[3, 16, 16\]" \
  eval --weights "$fixtures/model" --head "$fixtures/head.safetensors" --data small.h5 --results bad.json
cp -r "$fixtures/model" broken && sed -i 's/"hidden_act": "quick_gelu"/"hidden_act": "relu"/' broken/config.json
expect_bad "an unsupported activation" '"hidden_act": "relu" is not supported' \
  signs --weights broken --head "$fixtures/head.safetensors" --data images.h5 --out bad.safetensors
cp -r "$fixtures/model" short && sed -i 's/"num_hidden_layers": 2/"num_hidden_layers": 3/' short/config.json
expect_bad "a config with a layer the checkpoint lacks" "tensor(s) missing: 'vision_model.encoder.layers.2" \
  eval --weights short --head "$fixtures/head.safetensors" --data images.h5 --results bad.json
expect_bad "--head on a model that is not CLIP" "--head is for CLIP models" \
  eval --weights "$repo/tests/fixtures/decoders/llama/model" --head "$fixtures/head.safetensors" --data images.h5 --results bad.json
finish
