#!/usr/bin/env bash
# gradfix eval on Hugging Face decoder directories (the transformers fixtures in
# tests/fixtures/decoders): per-sample losses equal transformers' within 1e-4, results
# byte-identical at 1 and 3 ranks, and bad inputs refused with exit 2 naming what is wrong.
#   decoder_cli_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/decoders
work=$(mktemp -d /tmp/gradfix-decoder-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Bad input: exit 2, the message, and no results written.
expect_bad() {  # expect_bad DESCRIPTION PATTERN ARGS...
  local description=$1 pattern=$2
  shift 2
  expect_exit2 "$description" "$pattern" "$gradfix" "$@"
  check "$description: no results" test ! -e bad.json
}

# The reference losses (F64) from a safetensors file, with Python's standard library only.
reference_losses() {
  python3 - "$1" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
entry = json.loads(raw[8:8 + n])["per_sample_loss"]
begin, end = entry["data_offsets"]
print(json.dumps(list(struct.unpack("<%dd" % ((end - begin) // 8), raw[8 + n + begin:8 + n + end]))))
PY
}

for model in llama qwen2 mistral qwen3 gemma2; do
  "$gradfix" convert "$fixtures/$model/tokens.safetensors" "$model.h5" >/dev/null
  "$gradfix" eval --weights "$fixtures/$model/model" --data "$model.h5" --results "$model.json" >eval.log
  check "$model: eval names the architecture" grep -q "eval: $model, 5 samples" eval.log
  expected=$(reference_losses "$fixtures/$model/reference.safetensors")
  check "$model: per-sample losses equal transformers' within 1e-4" python3 -c "
import json
got = json.load(open('$model.json'))['per_sample_loss']; want = json.loads('$expected')
assert len(got) == len(want) == 5, (got, want)
assert all(abs(g - w) <= 1e-4 * abs(w) for g, w in zip(got, want)), (got, want)"
  mpirun "${mpirun_flags[@]}" -np 3 "$gradfix" eval --weights "$fixtures/$model/model" --data "$model.h5" --results "${model}_3.json" >/dev/null
  check "$model: results byte-identical at 1 and 3 ranks" cmp -s "$model.json" "${model}_3.json"
  # A buffer bound of 64 elements cuts the head into blocks of one vocabulary row: the streaming
  # log-sum-exp over 96 blocks gives the same losses and the same predictions.
  mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" eval --weights "$fixtures/$model/model" --data "$model.h5" --chunk-elements 64 \
    --results "${model}_blocks.json" >/dev/null
  check "$model: the head in 96 blocks: losses within 1e-6 and the same hits" python3 -c "
import json
whole, blocks = json.load(open('$model.json')), json.load(open('${model}_blocks.json'))
assert all(abs(g - w) <= 1e-6 * abs(w) for g, w in zip(blocks['per_sample_loss'], whole['per_sample_loss'])), (blocks, whole)
assert blocks['token_accuracy'] == whole['token_accuracy'], (blocks, whole)"
done

# signs with the parameters sharded over 1-4 ranks: the votes equal transformers' float64
# reference (one backward per sample) wherever the gradient is not within rounding of zero
# (the reference's relative margin below 1e-4), the fast and loop methods agree, and the vote
# files are byte-identical for every rank count.
compare_votes() {  # compare_votes VOTES REFERENCE [MARGIN]: equal where the reference's margin is >= MARGIN (1e-4)
  python3 - "$1" "$2" "${3:-1e-4}" <<'PY'
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
margin = float(sys.argv[3])
differ = sum(1 for name in names for v, r, m in zip(votes[name], reference["votes." + name], reference["margin." + name]) if v != r and m >= margin)
nonzero = sum(1 for name in names for v in votes[name] if v != 0)
print(differ, nonzero)
sys.exit(0 if differ == 0 and nonzero > 0 else 1)
PY
}
for model in llama qwen2 mistral qwen3 gemma2; do
  "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --out "${model}_votes1.safetensors" >signs.log
  check "$model: signs stores 5 votes per entry as I8" grep -q "signs max: $model, 5 samples, .* tensors as I8" signs.log
  check "$model: votes equal transformers' per-sample reference" compare_votes "${model}_votes1.safetensors" "$fixtures/$model/reference.safetensors"
  "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --method loop --out "${model}_loop.safetensors" >/dev/null
  check "$model: the loop method (one backward per sample) gives the same votes" cmp -s "${model}_votes1.safetensors" "${model}_loop.safetensors"
  for ranks in 2 3 4; do
    mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" \
      --out "${model}_votes$ranks.safetensors" >/dev/null
    check "$model: votes byte-identical at 1 and $ranks ranks" cmp -s "${model}_votes1.safetensors" "${model}_votes$ranks.safetensors"
  done
  # The head in blocks of one row (and a tied head's embedding rows joining each block).
  "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --chunk-elements 64 --out "${model}_blocks1.safetensors" >/dev/null
  check "$model: votes with the head in 96 blocks equal transformers' reference" compare_votes "${model}_blocks1.safetensors" "$fixtures/$model/reference.safetensors"
  mpirun "${mpirun_flags[@]}" -np 3 "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --chunk-elements 64 --method loop \
    --out "${model}_blocks3.safetensors" >/dev/null
  check "$model: with 96 blocks, the loop method at 3 ranks gives the same votes" cmp -s "${model}_blocks1.safetensors" "${model}_blocks3.safetensors"
  # --vote-precision bf16: votes from bfloat16 products change only where a sample's gradient is
  # within bfloat16's rounding of zero (here: every differing entry's margin is below 0.0013 on
  # these fixtures; 0.02 is the bound asserted), the same bytes at any P, recorded in the file.
  "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --vote-precision bf16 --out "${model}_bf16.safetensors" >signs.log
  check "$model: bf16 votes are said" grep -q "signs max (bf16 products): $model" signs.log
  check "$model: bf16 votes equal transformers' reference where its margin is >= 0.02" \
    compare_votes "${model}_bf16.safetensors" "$fixtures/$model/reference.safetensors" 0.02
  check "$model: bf16 votes are recorded as such" grep -aq '"gradfix.vote_precision":"bf16"' "${model}_bf16.safetensors"
  mpirun "${mpirun_flags[@]}" -np 3 "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --vote-precision bf16 \
    --out "${model}_bf16_3.safetensors" >/dev/null
  check "$model: bf16 votes byte-identical at 1 and 3 ranks" cmp -s "${model}_bf16.safetensors" "${model}_bf16_3.safetensors"
done
expect_bad "--vote-precision bf16 with --method loop" "vote-precision bf16 narrows the fast method's per-sample products; --method loop" \
  signs --weights "$fixtures/llama/model" --data llama.h5 --method loop --vote-precision bf16 --out bad.json
expect_bad "--vote-precision bf16 with --sign-mode mean" "vote-precision bf16 narrows the products of per-sample votes" \
  signs --weights "$fixtures/llama/model" --data llama.h5 --sign-mode mean --vote-precision bf16 --out bad.json
# Two samples of a seeded shuffle; the votes are then at most 2 in magnitude.
"$gradfix" signs --weights "$fixtures/qwen2/model" --data qwen2.h5 --num-samples 2 --seed 4 --out two.safetensors >signs.log
check "--num-samples 2 takes two samples" grep -q "qwen2, 2 samples" signs.log

# --report-time: every rank's wall time and waits, and the BLAS kernel that ran the products.
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" signs --weights "$fixtures/qwen2/model" --data qwen2.h5 --out timed.safetensors \
  --report-time --quiet >timed.log
check "--report-time reports both ranks' waits on gathers and reductions" \
  test "$(grep -cE '^  rank [01]: [0-9.]+ wall, [0-9.]+ gathers \([0-9.]+%\), [0-9.]+ reductions' timed.log)" -eq 2
check "--report-time names the BLAS" grep -q "^BLAS: " timed.log
check "the timed votes are the untimed ones" cmp -s qwen2_votes1.safetensors timed.safetensors
# --prefetch (on by default): at 2 ranks each layer's and head block's gather runs ahead on the
# helper thread (its time reported as "ahead"); off, every gather waits for its stage. The votes
# are the same bytes either way.
check "--prefetch on: gathers ran ahead on both ranks" \
  test "$(grep -cE '^  rank [01]: .* reductions \([0-9.]+%\); [0-9.]+ ahead \([1-9][0-9]* gathers\)$' timed.log)" -eq 2
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" signs --weights "$fixtures/qwen2/model" --data qwen2.h5 --out unfetched.safetensors \
  --prefetch off --report-time --quiet >unfetched.log
check "--prefetch off: no gather ran ahead" test "$(grep -cE '^  rank [01]: .*; 0.00 ahead \(0 gathers\)$' unfetched.log)" -eq 2
check "--prefetch off: the same votes" cmp -s qwen2_votes1.safetensors unfetched.safetensors
expect_bad "an unknown --prefetch" "unknown --prefetch 'maybe'; valid: on|off" \
  signs --weights "$fixtures/qwen2/model" --data qwen2.h5 --prefetch maybe --out bad.json
OPENBLAS_CORETYPE=Haswell "$gradfix" signs --weights "$fixtures/qwen2/model" --data qwen2.h5 --out timed.safetensors --report-time --quiet >timed.log
if grep -q "^BLAS: OpenBLAS" timed.log; then
  check "a user's OPENBLAS_CORETYPE is kept and named" grep -q "^BLAS: OpenBLAS, kernel Haswell (OPENBLAS_CORETYPE)" timed.log
  # Where OpenBLAS's own choice is its generic Prescott kernel on a CPU with AVX-512 (a virtual
  # machine that masks the CPU model, as here), gradfix asks for SkylakeX and says so.
  env -u OPENBLAS_CORETYPE "$gradfix" signs --weights "$fixtures/qwen2/model" --data qwen2.h5 --out timed.safetensors --report-time --quiet >timed.log
  if grep -q "OpenBLAS picked Prescott" timed.log; then
    if grep -qw avx512f /proc/cpuinfo && grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo; then
      check "OpenBLAS's Prescott is replaced by SkylakeX on an AVX-512 CPU" grep -q "^BLAS: OpenBLAS, kernel SkylakeX (chosen by gradfix" timed.log
    fi
  else
    check "without a replacement, the kernel is OpenBLAS's own choice" bash -c "! grep -q 'chosen by gradfix' timed.log"
  fi
fi

# The votes feed the file subcommands on model directories: a task vector between two
# releases, masked by the votes, applied to the target.
"$gradfix" generate --like "$fixtures/llama/model" --like-scale 1 --noise 0.01 --seed 5 --out llama_ft >/dev/null
"$gradfix" taskvector --base "$fixtures/llama/model" --finetuned llama_ft --out tau.safetensors >/dev/null
"$gradfix" mask --task-vector tau.safetensors --signs llama_votes1.safetensors --out tau_masked.safetensors >mask.log
check "mask takes the decoder's votes under the model's names" grep -q "mask normal: 35 tensors" mask.log
"$gradfix" apply --base "$fixtures/llama/model" --task-vector tau_masked.safetensors --alpha 0.5 --out llama_transported >/dev/null
check "the transported checkpoint holds every tensor of the model" test "$("$gradfix" inspect llama_transported | grep -c 'model\.\|lm_head')" -ge 35
check "the transported directory carries config.json unchanged" cmp -s "$fixtures/llama/model/config.json" llama_transported/config.json
check "the transported directory carries generation_config.json" cmp -s "$fixtures/llama/model/generation_config.json" llama_transported/generation_config.json
"$gradfix" eval --weights llama_transported --data llama.h5 --results transported.json >/dev/null
check "the transported directory is a model gradfix evaluates" test -s transported.json
# A symbolic link in a model directory that leads out of it is refused by name, nothing written
# (links inside it, as a Hugging Face cache snapshot's, are followed: tests/cli/hub_cache_test.sh);
# --out-dtype updates config.json's torch_dtype.
cp -r "$fixtures/llama/model" linked && ln -s /etc/passwd linked/tokenizer.json
expect_exit2 "a link out of the model directory" "linked/tokenizer.json: a symbolic link to /etc/passwd, outside" \
  "$gradfix" convert linked linked_bf16 --out-dtype BF16
check "nothing is written after the refusal" test ! -e linked_bf16
rm linked/tokenizer.json
"$gradfix" convert linked linked_bf16 --out-dtype BF16 >/dev/null
check "--out-dtype BF16 sets torch_dtype in the carried config.json" grep -q '"torch_dtype": "bfloat16"' linked_bf16/config.json

# init writes a Hugging Face directory from a config: deterministic per seed and rank count,
# readable by eval, its config refused when it does not say the architecture asked for.
"$gradfix" init --arch llama --config-file "$repo/configs/tiny-llama.json" --seed 4 --out tiny >init.log
check "init reports the decoder" grep -q "init: llama, 4 layers, hidden 64" init.log
check "init writes config.json beside the weights (one model.safetensors, as save_pretrained writes a small model)" \
  test -f tiny/config.json -a -f tiny/model.safetensors -a ! -e tiny/model.safetensors.index.json
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" init --arch llama --config-file "$repo/configs/tiny-llama.json" --seed 4 --out tiny2 >/dev/null
check "init is the same at 1 and 2 ranks" diff -r tiny tiny2
"$gradfix" init --arch llama --config-file "$repo/configs/tiny-llama.json" --seed 5 --out tiny5 >/dev/null
check "another seed gives other weights" bash -c "! cmp -s tiny/model.safetensors tiny5/model.safetensors"
python3 -c "
import json, struct
ids = [1, 2, 3, 4, 5, 6]
labels = [-100, -100, 3, 4, 5, 6]
header = {'input_ids': {'dtype': 'I64', 'shape': [1, 6], 'data_offsets': [0, 48]}, 'labels': {'dtype': 'I64', 'shape': [1, 6], 'data_offsets': [48, 96]}}
text = json.dumps(header).encode(); text += b' ' * ((8 - len(text) % 8) % 8)
open('six.safetensors', 'wb').write(struct.pack('<Q', len(text)) + text + struct.pack('<6q', *ids) + struct.pack('<6q', *labels))"
"$gradfix" eval --weights tiny --data six.safetensors --results tiny.json >/dev/null
check "a fresh tiny llama predicts about uniformly (loss near ln 256 = 5.55)" python3 -c "
import json; loss = json.load(open('tiny.json'))['mean_loss']; assert 5.3 < loss < 5.8, loss"
# Every family initialises from its config: qwen3 (q/k norms) and gemma2, whose (1 + w) norms
# start at zero; a fresh model predicts about uniformly (ln 96 = 4.56).
for model in qwen3 gemma2; do
  sed 's/"initializer_range": 0.3/"initializer_range": 0.02/' "$fixtures/$model/model/config.json" >"${model}_config.json"
  "$gradfix" init --arch $model --config-file "${model}_config.json" --seed 4 --out "${model}_fresh" >init.log
  check "$model: init reports the decoder" grep -q "init: $model, 2 layers, hidden 32" init.log
  "$gradfix" eval --weights "${model}_fresh" --data "$model.h5" --results "${model}_fresh.json" >/dev/null
  check "$model: a fresh model predicts about uniformly" python3 -c "
import json; loss = json.load(open('${model}_fresh.json'))['mean_loss']; assert 4.3 < loss < 4.9, loss"
  check "$model: norms start at the identity's scale (1 for w, 0 for 1 + w)" python3 - "${model}_fresh/model.safetensors" $model <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n]); header.pop("__metadata__", None)
want = 0.0 if sys.argv[2] == "gemma2" else 1.0
norms = [k for k in header if "norm" in k]
assert len(norms) >= 5, norms
for k in norms:
    b, e = header[k]["data_offsets"]
    values = struct.unpack("<%df" % ((e - b) // 4), raw[8 + n + b:8 + n + e])
    assert all(v == want for v in values), (k, values[:4])
PY
done
expect_bad "init with a config of another architecture" '"model_type" is "llama" but --arch is qwen2' \
  init --arch qwen2 --config-file "$repo/configs/tiny-llama.json" --out bad_init
check "a refused init leaves nothing" test ! -e bad_init

# Bad inputs: exit 2, the file and the value named, no results written.
python3 - <<'PY'
import json, struct
ids = [5, 7, 99, 3]
labels = [-100, 7, 99, 3]
def tensor(values):
    return struct.pack("<%dq" % len(values), *values)
header = {"input_ids": {"dtype": "I64", "shape": [1, 4], "data_offsets": [0, 32]},
          "labels": {"dtype": "I64", "shape": [1, 4], "data_offsets": [32, 64]}}
text = json.dumps(header).encode(); text += b" " * ((8 - len(text) % 8) % 8)
open("out_of_range.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + tensor(ids) + tensor(labels))
PY
expect_bad "a token id past the vocabulary" "out_of_range.safetensors: sample 0, position 2: token id 99 >= the model's vocab_size 96" \
  eval --weights "$fixtures/llama/model" --data out_of_range.safetensors --results bad.json
cp -r "$fixtures/qwen2/model" no_config && rm no_config/config.json
expect_bad "a directory without config.json" "unknown checkpoint format\|config.json" \
  eval --weights no_config --data llama.h5 --results bad.json
cp -r "$fixtures/qwen2/model" missing_shard && rm missing_shard/model-00002-of-00002.safetensors
expect_bad "an index pointing at a missing shard" "model-00002-of-00002.safetensors" \
  eval --weights missing_shard --data qwen2.h5 --results bad.json
cp -r "$fixtures/llama/model" rope && sed -i 's/"llama3"/"dynamic"/' rope/config.json
expect_bad "an unsupported rotary type" '"rope_scaling.rope_type": "dynamic" is not supported' \
  eval --weights rope --data llama.h5 --results bad.json
finish
