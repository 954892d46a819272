#!/usr/bin/env bash
# PEFT LoRA adapters as task vectors (issue 8): `apply --task-vector ADAPTER_DIR` equals PEFT's
# merge_and_unload (fixtures made by tests/fixtures/lora/make_fixtures.py with peft) for plain
# LoRA on q/v projections, rsLoRA with alpha and rank patterns and an embedding, and GPT-2's
# Conv1D layers (fan_in_fan_out), at 1 to 3 ranks; an adapter is a task vector like any other
# for mask and merge (same bytes as its materialised copy); adapters gradfix cannot read right
# are refused, naming what is wrong.
#   lora_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
lora=$repo/tests/fixtures/lora
llama=$repo/tests/fixtures/decoders/llama/model
close=$repo/tests/support/close_tensors.py
same=$repo/tests/support/same_tensors.py
work=$(mktemp -d /tmp/gradfix-lora-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

for ranks in 1 2 3; do
  g=(mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix")
  for adapter in llama_qv llama_rslora; do
    "${g[@]}" apply --base "$llama" --task-vector "$lora/$adapter" --alpha 1 --out "p$ranks-$adapter.safetensors" --chunk-elements 100 >/dev/null
    check "P=$ranks: $adapter applied equals PEFT's merge_and_unload" "$close" "p$ranks-$adapter.safetensors" "$lora/$adapter/merged"
  done
  "${g[@]}" apply --base "$lora/gpt2_base" --task-vector "$lora/gpt2_conv1d" --alpha 1 --out "p$ranks-gpt2.safetensors" >/dev/null
  check "P=$ranks: GPT-2 Conv1D (fan_in_fan_out) equals PEFT's merge_and_unload" "$close" "p$ranks-gpt2.safetensors" "$lora/gpt2_conv1d/merged"
done
check "the same bytes at 1 and 3 ranks" "$same" p1-llama_rslora.safetensors p3-llama_rslora.safetensors
"$gradfix" apply --base "$llama" --task-vector "$lora/llama_qv" --alpha 0.5 --out half.safetensors >/dev/null
check "the comparison can fail: alpha 0.5 is not PEFT's merge" bash -c "! '$close' half.safetensors '$lora/llama_qv/merged' 2>/dev/null"

# Mask and merge read an adapter as they read its materialised task vector.
"$gradfix" convert "$lora/llama_qv" tau.safetensors >/dev/null
"$gradfix" generate --like tau.safetensors --like-scale 0 --noise 1 --seed 5 --out signs.safetensors >/dev/null
for ranks in 1 2; do
  g=(mpirun "${mpirun_flags[@]}" -np "$ranks" "$gradfix")
  "${g[@]}" mask --task-vector "$lora/llama_qv" --signs signs.safetensors --out "mask_adapter$ranks.safetensors" >/dev/null
  "${g[@]}" mask --task-vector tau.safetensors --signs signs.safetensors --out "mask_tau$ranks.safetensors" >/dev/null
  check "P=$ranks: mask of the adapter equals mask of its materialised task vector" "$same" "mask_adapter$ranks.safetensors" "mask_tau$ranks.safetensors"
  "${g[@]}" merge --task-vector "$lora/llama_qv" --task-vector tau.safetensors --method mean --out "merge$ranks.safetensors" >/dev/null
  check "P=$ranks: the mean of an adapter and its copy is the copy" "$same" "merge$ranks.safetensors" tau.safetensors
done
check "the model card chain names the adapter" bash -c \
  "'$gradfix' apply --base '$llama' --task-vector '$lora/llama_qv' --alpha 1 --out carded >/dev/null && grep -q 'task_vector: \`lora\`.*\"lora_alpha\":8' carded/README.md"

# Adapters that are not plain LoRA, or broken, are refused with the reason.
broken() {  # broken NAME JQ-LIKE-PYTHON: a copy of llama_qv with its config changed by a Python expression on `c`
  rm -rf "$1" && cp -r "$lora/llama_qv" "$1" && rm -rf "$1/merged"
  python3 -c "import json,sys; c=json.load(open('$1/adapter_config.json')); $2; json.dump(c, open('$1/adapter_config.json','w'))"
}
broken dora "c['use_dora'] = True"
expect_exit2 "DoRA is refused" "use_dora = true: DoRA" "$gradfix" apply --base "$llama" --task-vector dora --out o.safetensors
broken prefix "c['peft_type'] = 'PREFIX_TUNING'"
expect_exit2 "another PEFT type is refused" 'peft_type is "PREFIX_TUNING"' "$gradfix" inspect prefix
broken rank "c['r'] = 0"
expect_exit2 "r = 0 is refused" "r is 0" "$gradfix" inspect rank
broken saved "c['modules_to_save'] = ['lm_head']"
expect_exit2 "saved modules are refused" "modules_to_save" "$gradfix" inspect saved
broken pickle "pass" && mv pickle/adapter_model.safetensors pickle/adapter_model.bin
expect_exit2 "a pickle adapter is refused" "does not read adapter_model.bin" "$gradfix" inspect pickle
broken half "pass"
python3 - half <<'PY'
import json, struct, sys
path = sys.argv[1] + "/adapter_model.safetensors"
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
# Drop one lora_B: rewrite the file without it.
drop = [k for k in header if k.endswith("q_proj.lora_B.weight")][0]
keep = {k: v for k, v in header.items() if k not in (drop, "__metadata__")}
data, offset, entries = b"", 0, {}
for k, v in keep.items():
    chunk = raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]
    entries[k] = {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [offset, offset + len(chunk)]}
    data += chunk
    offset += len(chunk)
text = json.dumps(entries).encode()
open(path, "wb").write(struct.pack("<Q", len(text)) + text + data)
PY
expect_exit2 "a lora_A without its lora_B is refused" "q_proj' has lora_A without its pair" "$gradfix" inspect half
check "nothing was written by the refused runs" test ! -e o.safetensors
finish
