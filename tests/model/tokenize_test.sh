#!/usr/bin/env bash
# launch/tokenize: JSONL samples -> token data that gradfix's decoders read. Token-id samples
# (no package needed) give hand-checked tensors; text samples go through the checked-in
# tokenizer.json when this Python has `tokenizers` (skipped with the reason otherwise: the test
# suite never installs packages); bad input is exit 2 naming the file and line, nothing written.
#   tokenize_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/decoders
tokenize=$repo/launch/tokenize
export GRADFIX=$gradfix
work=$(mktemp -d /tmp/gradfix-tokenize-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
cp -r "$fixtures/llama/model" model
cp "$fixtures/tokenizer/tokenizer.json" model/

# Reads a token file (safetensors, or HDF5 after gradfix convert) as {name: [rows]}.
dump() {
  local file=$1
  case "$file" in *.h5) "$gradfix" convert "$file" dump.safetensors >/dev/null; file=dump.safetensors ;; esac
  python3 - "$file" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n]); header.pop("__metadata__", None)
out = {}
for name, entry in header.items():
    begin, end = entry["data_offsets"]
    rows, cols = entry["shape"]
    values = struct.unpack("<%dq" % (rows * cols), raw[8 + n + begin:8 + n + end])
    out[name] = [list(values[r * cols:(r + 1) * cols]) for r in range(rows)]
print(json.dumps(out, sort_keys=True))
PY
}

# Token ids: prompt + completion + eos (2, from generation_config.json), right-padded.
cat >ids.jsonl <<'JSONL'
{"prompt_ids": [1, 5, 6], "completion_ids": [7, 8]}

{"prompt_ids": [1], "completion_ids": [9]}
JSONL
"$tokenize" --model model --jsonl ids.jsonl --out ids.h5 >tokenize.log
check "tokenize reports the samples" grep -q "tokenize: 2 samples of 6 tokens, 5 target tokens, written to ids.h5" tokenize.log
check "token ids: input_ids, labels and attention_mask as hand-checked" test "$(dump ids.h5)" = \
  '{"attention_mask": [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], "input_ids": [[1, 5, 6, 7, 8, 2], [1, 9, 2, 0, 0, 0]], "labels": [[-100, -100, -100, 7, 8, 2], [-100, 9, 2, -100, -100, -100]]}'
"$tokenize" --model model --jsonl ids.jsonl --out cut.safetensors --max-length 4 --no-eos >/dev/null
check "--max-length 4 --no-eos cuts and leaves out eos" test "$(dump cut.safetensors)" = \
  '{"attention_mask": [[1, 1, 1, 1], [1, 1, 0, 0]], "input_ids": [[1, 5, 6, 7], [1, 9, 0, 0]], "labels": [[-100, -100, -100, 7], [-100, 9, -100, -100]]}'
"$gradfix" eval --weights model --data ids.h5 --results eval.json >eval.log
check "gradfix eval reads the tokenized file (5 target tokens)" grep -q '"target_tokens": 5' eval.json

# Text through the tokenizer: "<s>" added before the prompt only.
cat >text.jsonl <<'JSONL'
{"prompt": "translate to french : cat ->", "completion": "chat"}
{"prompt": "translate to french : dog ->", "completion": "chien"}
JSONL
if python3 -c "import tokenizers" 2>/dev/null; then
  "$tokenize" --model model --jsonl text.jsonl --out text.h5 --no-install >/dev/null
  check "text: tokenized as the tokenizer says" test "$(dump text.h5)" = \
    '{"attention_mask": [[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]], "input_ids": [[1, 3, 4, 5, 6, 7, 17, 9, 2], [1, 3, 4, 5, 6, 8, 17, 10, 2]], "labels": [[-100, -100, -100, -100, -100, -100, -100, 9, 2], [-100, -100, -100, -100, -100, -100, -100, 10, 2]]}'
else
  echo "SKIPPED: text samples (this python3 has no \`tokenizers\`; launch/tokenize would install it into a venv)"
  set +e; "$tokenize" --model model --jsonl text.jsonl --out text.h5 --no-install >out.txt 2>&1; code=$?; set -e
  check "text without tokenizers and --no-install: exit 2 (got $code)" test "$code" -eq 2
  check "text without tokenizers: says what to do" grep -q "need the \`tokenizers\` package" out.txt
fi

# Bad input: exit 2, file and line named, nothing written.
expect_bad() {  # expect_bad DESCRIPTION PATTERN JSONL_TEXT [ARGS...]
  local description=$1 pattern=$2 text=$3
  shift 3
  printf '%s' "$text" >bad.jsonl
  expect_exit2 "$description" "$pattern" "$tokenize" --model model --jsonl bad.jsonl --out bad.h5 --no-install "$@"
  check "$description: nothing written" test ! -e bad.h5
}
expect_bad "an empty file" "bad.jsonl: no samples (the file is empty)" ""
expect_bad "a token id past the vocabulary" "bad.jsonl: line 2: token id 96 at position 1 is outside the vocabulary \[0, 96)" \
  $'{"prompt_ids": [1], "completion_ids": [3]}\n{"prompt_ids": [1, 96], "completion_ids": [3]}\n'
expect_bad "a negative token id" "line 1: token id -5" $'{"prompt_ids": [1], "completion_ids": [-5]}\n'
expect_bad "an empty completion" "bad.jsonl: line 1: no completion token left to learn from (the completion is empty)" \
  $'{"prompt_ids": [1, 2], "completion_ids": []}\n' --no-eos
expect_bad "a completion cut away" "line 1: no completion token left to learn from within --max-length 2" \
  $'{"prompt_ids": [1, 2, 3], "completion_ids": [4]}\n' --max-length 2
expect_bad "ids that are not integers" "line 1: \"completion_ids\" must be a list of integers" $'{"prompt_ids": [1], "completion_ids": [1.5]}\n'
expect_bad "a line that is not JSON" "bad.jsonl: line 1: not a JSON object" $'{"prompt_ids": [1]\n'
expect_bad "text and ids mixed" "mixes text samples and token-id samples" \
  $'{"prompt_ids": [1], "completion_ids": [3]}\n{"prompt": "a", "completion": "b"}\n'
expect_bad "a missing key" "line 1: \"completion_ids\" is missing" $'{"prompt_ids": [1]}\n'
rm model/config.json
expect_bad "a model without config.json" "model/config.json: no config.json" $'{"prompt_ids": [1], "completion_ids": [3]}\n'
finish
