#!/usr/bin/env bash
# Shot selection (--selection coreset|kmedoids|herding, --selection-features, --save-indices) as
# users run it, against a brute-force reference in plain Python of the official GradFix code's
# definitions (grad_sign/dataset_sampler.py): coreset and herding on a features file; the
# built-in MLP's own features (its penultimate activations, recomputed here from its weights);
# CLIP's own features (the image embeddings transformers recorded for the fixture); k-medoids on
# clearly clustered features; the same selection at 1 and 2 ranks; the saved indices read back by
# --indices give the same votes; transport draws the same shots; bad combinations refused.
#   selection_cli_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/clip
work=$(mktemp -d /tmp/gradfix-selection-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

expect_bad() {  # expect_bad DESCRIPTION PATTERN ARGS...
  local description=$1 pattern=$2
  shift 2
  expect_exit2 "$description" "$pattern" "$gradfix" "$@"
  check "$description: nothing written" test ! -e bad.safetensors -a ! -e bad.txt
}

# The reference: safetensors reading, the official rules, and an MLP's penultimate activations.
cat >reference.py <<'PY'
import json, math, struct, sys

def read(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        fmt = {"F32": "f", "F64": "d", "I64": "q"}[entry["dtype"]]
        out[name] = (entry["shape"], list(struct.unpack("<%d%s" % ((end - begin) // struct.calcsize(fmt), fmt), raw[8 + n + begin:8 + n + end])))
    return out

def rows(shape, values):
    return [values[i * shape[1]:(i + 1) * shape[1]] for i in range(shape[0])]

def normalise(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm > 0 else v

def dist(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

def coreset(f, k):
    d = [[dist(a, b) for b in f] for a in f]
    first = min(range(len(f)), key=lambda i: (sum(d[i]), i))
    chosen, remaining = [first], [i for i in range(len(f)) if i != first]
    while len(chosen) < k:
        best = min(remaining, key=lambda c: (min(d[c][s] for s in chosen), c))
        chosen.append(best)
        remaining.remove(best)
    return chosen

def herding(f, k):
    dim = len(f[0])
    mean = normalise([sum(r[j] for r in f) / len(f) for j in range(dim)])
    chosen, total = [], [0.0] * dim
    for step in range(k):
        best = min((c for c in range(len(f)) if c not in chosen),
                   key=lambda c: (dist([(total[j] + f[c][j]) / (step + 1) for j in range(dim)], mean), c))
        chosen.append(best)
        total = [total[j] + f[best][j] for j in range(dim)]
    return chosen

def select(rule, features, labels, k):
    out = []
    for c in range(max(labels) + 1):
        members = [i for i, l in enumerate(labels) if l == c]
        f = [normalise(features[i]) for i in members]
        out += [members[i] for i in (coreset(f, k) if rule == "coreset" else herding(f, k))]
    return out

def mlp_features(weights_path, data_path):
    w = read(weights_path)
    x_shape, x = read(data_path)["inputs"]
    width = len(x) // x_shape[0]
    layers = sorted({int(name.split(".")[1]) for name in w})
    h = [x[i * width:(i + 1) * width] for i in range(x_shape[0])]
    for layer in layers[:-1]:
        ws, wv = w["layers.%d.weight" % layer]
        bs, bv = w["layers.%d.bias" % layer]
        W = rows(ws, wv)
        h = [[max(0.0, sum(a * b for a, b in zip(row, v)) + bv[o]) for o, row in enumerate(W)] for v in h]
    return h

if __name__ == "__main__":
    command = sys.argv[1]
    if command == "select":  # select RULE FEATURES.safetensors DATA.safetensors K
        rule, features_path, data_path, k = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        shape, values = list(read(features_path).values())[0]
        labels = read(data_path)["labels"][1]
        print("\n".join(map(str, select(rule, rows(shape, values), labels, k))))
    elif command == "select-mlp":  # select-mlp RULE WEIGHTS DATA K
        rule, weights_path, data_path, k = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        labels = read(data_path)["labels"][1]
        print("\n".join(map(str, select(rule, mlp_features(weights_path, data_path), labels, k))))
    elif command == "select-all":  # select-all RULE FEATURES K: unlabelled data, one class
        rule, features_path, k = sys.argv[2], sys.argv[3], int(sys.argv[4])
        shape, values = list(read(features_path).values())[0]
        print("\n".join(map(str, select(rule, rows(shape, values), [0] * shape[0], k))))
PY

# Data: 40 samples of 12 inputs in 3 classes; features [40, 5]; and features in clear clusters.
python3 - <<'PY'
import json, random, struct
def write(path, tensors):
    header, body = {}, b""
    for name, dtype, shape, fmt, values in tensors:
        data = struct.pack("<%d%s" % (len(values), fmt), *values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    text = json.dumps(header).encode(); text += b" " * ((8 - len(text) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + body)
rng = random.Random(7)
n = 40
labels = [i % 3 for i in range(n)]
write("data.safetensors", [("inputs", "F32", [n, 12], "f", [rng.gauss(0, 1) for _ in range(n * 12)]), ("labels", "I64", [n], "q", labels)])
write("features.safetensors", [("features", "F32", [n, 5], "f", [rng.gauss(0, 1) for _ in range(n * 5)])])
write("short_features.safetensors", [("features", "F32", [n - 1, 5], "f", [0.5] * ((n - 1) * 5))])
# Clusters: in each class, two tight groups around directions 0 and 90 degrees (in 2-D), the
# first member of each group exactly on the direction (the group's medoid).
clustered = []
for i in range(n):
    member = i // 3                      # 0 .. 13 within the class
    group = member % 2
    base = [1.0, 0.0] if group == 0 else [0.0, 1.0]
    offset = 0.0 if member < 2 else (0.05 if member % 4 < 2 else -0.05)
    clustered += [base[0] + (offset if group == 1 else 0.0), base[1] + (offset if group == 0 else 0.0)]
write("clustered.safetensors", [("features", "F32", [n, 2], "f", clustered)])
PY
"$gradfix" convert data.safetensors data.h5 >/dev/null
"$gradfix" init --arch mlp --dims 12,6,3 --seed 2 --out mlp.safetensors >/dev/null

for rule in coreset herding; do
  "$gradfix" signs --weights mlp.safetensors --data data.h5 --shots-per-class 3 --selection "$rule" \
    --selection-features features.safetensors --save-indices "$rule.txt" --out "$rule.safetensors" >/dev/null
  python3 reference.py select "$rule" features.safetensors data.safetensors 3 >"$rule.expected"
  check "$rule on a features file picks what the official definition picks" cmp -s "$rule.txt" "$rule.expected"
  "$gradfix" signs --weights mlp.safetensors --data data.h5 --indices "$rule.txt" --out "$rule-by-indices.safetensors" >/dev/null
  check "$rule: the saved indices, read back with --indices, give the same votes" cmp -s "$rule.safetensors" "$rule-by-indices.safetensors"
  "$gradfix" signs --weights mlp.safetensors --data data.h5 --shots-per-class 3 --selection "$rule" --save-indices "$rule-own.txt" \
    --out own.safetensors >/dev/null
  python3 reference.py select-mlp "$rule" mlp.safetensors data.safetensors 3 >"$rule-own.expected"
  check "$rule on the MLP's own penultimate activations picks what the reference picks" cmp -s "$rule-own.txt" "$rule-own.expected"
  mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" signs --weights mlp.safetensors --data data.h5 --shots-per-class 3 --selection "$rule" \
    --save-indices "$rule-own2.txt" --out own2.safetensors >/dev/null
  check "$rule: the same shots at 2 ranks" cmp -s "$rule-own.txt" "$rule-own2.txt"
done
check "coreset and herding pick different shots here" bash -c "! cmp -s coreset.txt herding.txt"
# Few-shot fine-tuning with train: the selected shots, then the same shots given as indices.
"$gradfix" train --weights mlp.safetensors --data data.h5 --shots-per-class 3 --selection herding --selection-features features.safetensors \
  --save-indices train-herding.txt --epochs 2 --batch 4 --seed 1 --out tuned.safetensors >train.log
check "train on herding shots: 9 samples" grep -q "train: 9 samples" train.log
check "train saves the same herding shots as signs" cmp -s train-herding.txt herding.txt
"$gradfix" train --weights mlp.safetensors --data data.h5 --indices herding.txt --epochs 2 --batch 4 --seed 1 --out tuned-indices.safetensors >/dev/null
check "train on the saved indices gives the same weights" cmp -s tuned.safetensors tuned-indices.safetensors

# k-medoids on two tight groups per class: one shot from each group, the group's medoid (the
# member exactly on its direction), for any seed.
for seed in 0 1 2; do
  "$gradfix" signs --weights mlp.safetensors --data data.h5 --shots-per-class 2 --selection kmedoids --seed "$seed" \
    --selection-features clustered.safetensors --save-indices "kmedoids$seed.txt" --out kmedoids.safetensors >/dev/null
  check "kmedoids (seed $seed) takes each group's medoid" python3 -c "
chosen = sorted(int(x) for x in open('kmedoids$seed.txt'))
# Class c's members are rows c, c + 3, c + 6, ...; its members 0 and 1 (rows c and c + 3) sit on
# the two directions.
assert chosen == sorted([c for c in range(3)] + [c + 3 for c in range(3)]), chosen"
done

# CLIP: its own features are the image embeddings; transformers recorded them for the fixture
# images, so a features file of those must pick the same shots as the default.
# The fixture's six images relabelled 0, 0, 0, 1, 1, 1: two classes of three (with two, herding and
# k-medoids would tie exactly: both rows are as near the mean).
python3 - "$fixtures/images.safetensors" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
entry = json.loads(raw[8:8 + n])["inputs"]
begin, end = entry["data_offsets"]
pixels = raw[8 + n + begin:8 + n + end]
header = {"inputs": {"dtype": "F32", "shape": entry["shape"], "data_offsets": [0, len(pixels)]},
          "labels": {"dtype": "I64", "shape": [6], "data_offsets": [len(pixels), len(pixels) + 48]}}
text = json.dumps(header).encode(); text += b" " * ((8 - len(text) % 8) % 8)
open("images.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + pixels + struct.pack("<6q", 0, 0, 0, 1, 1, 1))
PY
"$gradfix" convert images.safetensors images.h5 >/dev/null
python3 - "$fixtures/reference.safetensors" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
entry = json.loads(raw[8:8 + n])["image_embeds"]
begin, end = entry["data_offsets"]
text = json.dumps({"features": {"dtype": "F32", "shape": entry["shape"], "data_offsets": [0, end - begin]}}).encode()
text += b" " * ((8 - len(text) % 8) % 8)
open("clip_embeds.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + raw[8 + n + begin:8 + n + end])
PY
clip=(signs --weights "$fixtures/model" --head "$fixtures/head.safetensors" --data images.h5 --shots-per-class 1)
for rule in coreset herding kmedoids; do
  "$gradfix" "${clip[@]}" --selection "$rule" --save-indices "clip-$rule.txt" --out clip.safetensors >/dev/null
  "$gradfix" "${clip[@]}" --selection "$rule" --selection-features clip_embeds.safetensors --save-indices "clip-$rule-file.txt" \
    --out clip.safetensors >/dev/null
  check "CLIP $rule on its own embeddings equals $rule on transformers' embeddings" cmp -s "clip-$rule.txt" "clip-$rule-file.txt"
  mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" "${clip[@]}" --selection "$rule" --save-indices "clip-$rule-2.txt" --out clip.safetensors >/dev/null
  check "CLIP $rule: the same shots at 2 ranks" cmp -s "clip-$rule.txt" "clip-$rule-2.txt"
done
"$gradfix" taskvector --base "$fixtures/model" --finetuned "$fixtures/model" --include '^vision_model\.|^visual_projection' \
  --out zero_tau.safetensors >/dev/null
"$gradfix" transport --target "$fixtures/model" --head "$fixtures/head.safetensors" --task-vector zero_tau.safetensors --data images.h5 \
  --test-data images.h5 --shots-per-class 1 --selection herding --support-size 2 --alphas 1 --no-few-shot-baseline \
  --save-indices transport-herding.txt >/dev/null
check "transport draws the same herding shots as signs" cmp -s clip-herding.txt transport-herding.txt

# Token data (no classes): N of the whole pool. On a features file, the official rule over one
# class; on the decoder's own features (its last layer's output averaged over each sequence's
# tokens), the same at 1 and 2 ranks, and transport draws what signs draws.
llama=$repo/tests/fixtures/decoders/llama
python3 - <<'PY'
import json, random, struct
rng = random.Random(3)
values = [rng.gauss(0, 1) for _ in range(5 * 4)]
text = json.dumps({"features": {"dtype": "F32", "shape": [5, 4], "data_offsets": [0, 80]}}).encode()
text += b" " * ((8 - len(text) % 8) % 8)
open("token_features.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + struct.pack("<20f", *values))
PY
for rule in coreset herding; do
  "$gradfix" signs --weights "$llama/model" --data "$llama/tokens.safetensors" --num-samples 3 --selection "$rule" \
    --selection-features token_features.safetensors --save-indices "tokens-$rule.txt" --out tokens.safetensors >/dev/null
  python3 reference.py select-all "$rule" token_features.safetensors 3 >"tokens-$rule.expected"
  check "$rule of 3 token sequences on a features file picks what the official definition picks" cmp -s "tokens-$rule.txt" "tokens-$rule.expected"
done
"$gradfix" signs --weights "$llama/model" --data "$llama/tokens.safetensors" --num-samples 2 --selection herding \
  --save-indices tokens-own.txt --out tokens.safetensors >/dev/null
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" signs --weights "$llama/model" --data "$llama/tokens.safetensors" --num-samples 2 \
  --selection herding --save-indices tokens-own2.txt --out tokens.safetensors >/dev/null
check "herding on the decoder's own features: 2 sequences, the same at 2 ranks" \
  bash -c "[ \$(wc -l <tokens-own.txt) -eq 2 ] && cmp -s tokens-own.txt tokens-own2.txt"
"$gradfix" taskvector --base "$llama/model" --finetuned "$llama/model" --out llama_zero_tau.safetensors >/dev/null
"$gradfix" transport --target "$llama/model" --task-vector llama_zero_tau.safetensors --data "$llama/tokens.safetensors" \
  --test-data "$llama/tokens.safetensors" --num-samples 2 --selection herding --support-size 2 --alphas 1 --no-few-shot-baseline \
  --save-indices tokens-transport.txt >/dev/null
check "decoder transport draws the same herding sequences as signs" cmp -s tokens-own.txt tokens-transport.txt

# Bad combinations.
expect_bad "a strategy with an indices file" "--selection herding picks K shots per class" \
  signs --weights mlp.safetensors --data data.h5 --indices coreset.txt --selection herding --out bad.safetensors
expect_bad "features of the wrong length" "short_features.safetensors: 'features' is \[39, 5\] but the data has 40 samples" \
  signs --weights mlp.safetensors --data data.h5 --selection coreset --selection-features short_features.safetensors --out bad.safetensors
expect_bad "features with random" "--selection-features is for --selection coreset, kmedoids or herding" \
  signs --weights mlp.safetensors --data data.h5 --selection-features features.safetensors --out bad.safetensors
expect_bad "train with a strategy but no shots" "give --shots-per-class K" \
  train --weights mlp.safetensors --data data.h5 --selection coreset --out bad.safetensors
expect_bad "a strategy over every sequence of token data" "or without --num-samples" \
  signs --weights "$llama/model" --data "$llama/tokens.safetensors" --selection coreset --out bad.safetensors
expect_bad "an unknown strategy" "unknown --selection 'medoids'; valid: random|coreset|kmedoids|herding" \
  signs --weights mlp.safetensors --data data.h5 --selection medoids --out bad.safetensors
expect_bad "more shots than a class has" "class 0 has 14 samples available, fewer than the 20" \
  signs --weights mlp.safetensors --data data.h5 --shots-per-class 20 --selection coreset --selection-features features.safetensors --out bad.safetensors
finish
