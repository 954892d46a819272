#!/usr/bin/env bash
# launch/zeroshot-head: bad inputs are refused with exit 2 before any package is needed; where this
# Python has torch and transformers (never installed by the test suite), a head is built from the
# CLIP fixture (given a tiny word-level tokenizer) and checked: [classes, projection_dim] unit
# rows, the model's logit_scale beside them, and gradfix eval takes it.
#   zeroshot_head_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
head_tool=$repo/launch/zeroshot-head
work=$(mktemp -d /tmp/gradfix-zeroshot-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
printf 'cat\ndog\nbird\nfish\ncar\n' >classes.txt

expect_bad() {  # expect_bad DESCRIPTION PATTERN ARGS...
  local description=$1 pattern=$2
  shift 2
  expect_exit2 "$description" "$pattern" "$head_tool" "$@" --no-install
  check "$description: nothing written" test ! -e bad.safetensors
}
printf 'a photo\n' >no_slot.txt
expect_bad "a template without {}" "the template 'a photo' has no {} for the class name" \
  --model "$repo/tests/fixtures/clip/model" --classes classes.txt --templates no_slot.txt --out bad.safetensors
expect_bad "a decoder directory" '"model_type" is .llama.; the head needs a CLIPModel' \
  --model "$repo/tests/fixtures/decoders/llama/model" --classes classes.txt --out bad.safetensors
: >empty.txt
expect_bad "no classes" "empty.txt: empty (class names)" --model "$repo/tests/fixtures/clip/model" --classes empty.txt --out bad.safetensors

if ! python3 -c "import torch, transformers, tokenizers" 2>/dev/null; then
  echo "SKIPPED: building a head (this python3 has no torch/transformers; launch/zeroshot-head would install them into a venv)"
  finish
  exit
fi
cp -r "$repo/tests/fixtures/clip/model" model
python3 - <<'PY'
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
words = ["<|startoftext|>", "<|endoftext|>", "a", "photo", "of", "the", "cat", "dog", "bird", "fish", "car", ".", "bad", "good",
         "close-up", "cropped"]
tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                        unk_token="<|endoftext|>").save_pretrained("model")
PY
"$head_tool" --model model --classes classes.txt --out head.safetensors --no-install >tool.log 2>&1
check "the head is built" grep -q "zeroshot-head: 5 classes x 24, 6 templates, written to head.safetensors" tool.log
check "head [5, 24] of unit rows and the model's logit_scale" python3 - <<'PY'
import json, math, struct
raw = open("head.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
begin, end = header["head"]["data_offsets"]
values = struct.unpack("<%df" % ((end - begin) // 4), raw[8 + n + begin:8 + n + end])
assert header["head"]["shape"] == [5, 24], header
rows = [values[i * 24:(i + 1) * 24] for i in range(5)]
assert all(abs(math.sqrt(sum(v * v for v in row)) - 1) < 1e-5 for row in rows)
begin, end = header["logit_scale"]["data_offsets"]
assert abs(struct.unpack("<f", raw[8 + n + begin:8 + n + end])[0] - 2.3026) < 1e-4
PY
"$gradfix" convert "$repo/tests/fixtures/clip/images.safetensors" images.h5 >/dev/null
check "gradfix eval takes the head" "$gradfix" eval --weights model --head head.safetensors --data images.h5
finish
