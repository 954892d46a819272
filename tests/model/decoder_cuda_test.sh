#!/usr/bin/env bash
# The Hugging Face decoders on GPUs: eval and signs with --device cuda, at 1 rank and at 2 ranks
# with --backend nccl (layers gathered device to device), against the transformers reference of
# the fixtures. Skipped (exit 77) where no CUDA device is usable: a CPU LibTorch, or no GPU.
#   decoder_cuda_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/decoders
work=$(mktemp -d /tmp/gradfix-decoder-cuda-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$gradfix" convert "$fixtures/llama/tokens.safetensors" llama.h5 >/dev/null
if ! "$gradfix" eval --weights "$fixtures/llama/model" --data llama.h5 --device cuda >probe.txt 2>&1; then
  echo "SKIPPED: no usable CUDA device: $(tail -1 probe.txt)"
  exit 77
fi
# Whether two vote files agree on 99.9% of entries (GPU kernels may round differently from the
# CPU's, which flips votes only where a gradient is within rounding of zero).
agree() {
  python3 - "$1" "$2" <<'PY'
import json, struct, sys
def votes(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n]); header.pop("__metadata__", None)
    return {k: raw[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]] for k, e in header.items()}
a, b = votes(sys.argv[1]), votes(sys.argv[2])
total = sum(len(v) for v in a.values())
same = sum(x == y for k in a for x, y in zip(a[k], b[k]))
sys.exit(0 if sorted(a) == sorted(b) and same >= 0.999 * total else 1)
PY
}
devices=$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)
for model in llama qwen2 mistral; do
  "$gradfix" convert "$fixtures/$model/tokens.safetensors" "$model.h5" >/dev/null
  "$gradfix" eval --weights "$fixtures/$model/model" --data "$model.h5" --device cuda --results "$model.json" >/dev/null
  check "$model on cuda: per-sample losses equal transformers' within 1e-4" python3 - "$model.json" "$fixtures/$model/reference.safetensors" <<'PY'
import json, struct, sys
got = json.load(open(sys.argv[1]))["per_sample_loss"]
raw = open(sys.argv[2], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
entry = json.loads(raw[8:8 + n])["per_sample_loss"]
begin, end = entry["data_offsets"]
want = struct.unpack("<%dd" % ((end - begin) // 8), raw[8 + n + begin:8 + n + end])
sys.exit(0 if all(abs(g - w) <= 1e-4 * abs(w) for g, w in zip(got, want)) else 1)
PY
  "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --out "${model}_cpu.safetensors" >/dev/null
  "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --device cuda --out "${model}_cuda.safetensors" >/dev/null
  check "$model: cuda votes agree with the cpu votes on 99.9% of entries" agree "${model}_cpu.safetensors" "${model}_cuda.safetensors"
  # bf16 products on tensor cores against float32 products on the GPU.
  "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --device cuda --vote-precision bf16 \
    --out "${model}_cuda_bf16.safetensors" >/dev/null
  check "$model: bf16 votes on the GPU agree with its float32 votes on 99.9% of entries" agree "${model}_cuda.safetensors" "${model}_cuda_bf16.safetensors"
  if [ "$devices" -ge 2 ]; then
    mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --device cuda --backend nccl \
      --out "${model}_nccl.safetensors" >/dev/null
    check "$model: votes at 2 GPUs (NCCL gathers) agree with 1 GPU" agree "${model}_cuda.safetensors" "${model}_nccl.safetensors"
    # Gathers ahead on the helper thread's NCCL twin and side stream (--prefetch on, the default
    # above) give the bytes of gathers in line.
    mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" signs --weights "$fixtures/$model/model" --data "$model.h5" --device cuda --backend nccl \
      --prefetch off --out "${model}_nccl_inline.safetensors" >/dev/null
    check "$model: 2 GPUs, --prefetch off: the same bytes" cmp -s "${model}_nccl.safetensors" "${model}_nccl_inline.safetensors"
  fi
done
[ "$devices" -ge 2 ] || echo "SKIPPED: the 2-GPU NCCL checks (one device here)"
finish
