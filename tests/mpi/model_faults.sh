#!/usr/bin/env bash
# A model job that fails on one rank of three: the few-shot samples are split across ranks and
# only rank 1 gets the sample whose inputs hold a NaN. Every rank must exit with the same code
# (2), the error must be printed once and name the data file, the sample and the rank, and
# nothing may be published. The same job without the bad sample succeeds, so the test can fail.
#   model_faults.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
source "$(dirname "$0")/common.sh"
work=$(mktemp -d /tmp/gradfix-model-faults-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
mkdir out codes

"$gradfix" init --arch mlp --dims 784,16,10 --seed 1 --out w.safetensors >/dev/null
# Nine samples, labels 0..8; sample 7 has a NaN pixel in the bad set. Written as safetensors
# with Python's standard library, then converted to the HDF5 dataset layout gradfix reads.
python3 - <<'PY'
import json, math, struct
def write(path, poison):
    n, width = 9, 784
    pixels = [((i * 31 + j * 7) % 255) / 255.0 for i in range(n) for j in range(width)]
    if poison:
        pixels[7 * width + 100] = math.nan
    inputs = struct.pack("<%df" % len(pixels), *pixels)
    labels = struct.pack("<9q", *range(9))
    header = {"inputs": {"dtype": "F32", "shape": [n, width], "data_offsets": [0, len(inputs)]},
              "labels": {"dtype": "I64", "shape": [n], "data_offsets": [len(inputs), len(inputs) + len(labels)]}}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + inputs + labels)
write("good.safetensors", False)
write("bad.safetensors", True)
PY
"$gradfix" convert good.safetensors good.h5 --allow-nonfinite >/dev/null
"$gradfix" convert bad.safetensors bad.h5 --allow-nonfinite >/dev/null
seq 0 8 > shots.txt

run_signs() {  # run_signs DATA: 3 ranks, each rank's exit code in codes/RANK
  rm -f codes/*
  set +e
  mpirun "${mpirun_flags[@]}" -np 3 bash -c '"$0" signs --weights w.safetensors --data "$1" --indices shots.txt \
    --out out/votes.safetensors; echo $? > codes/$OMPI_COMM_WORLD_RANK' "$gradfix" "$1" >stdout.txt 2>stderr.txt
  set -e
}

run_signs good.h5
check "the job succeeds without the bad sample" test "$(cat codes/0 codes/1 codes/2)" = "$(printf '0\n0\n0')"
check "the votes are published" test -f out/votes.safetensors
rm -f out/votes.safetensors

run_signs bad.h5
check "every rank exits with code 2 ($(cat codes/* | tr '\n' ' '))" test "$(cat codes/0 codes/1 codes/2)" = "$(printf '2\n2\n2')"
check "the error names the rank, the data file and the sample" grep -q "\[rank 1/3 on .*bad.h5: shot 7 has NaN at input element 100" stderr.txt
check "the error is printed once" test "$(grep -c 'gradfix: error' stderr.txt)" -eq 1
check "nothing is published" test -z "$(ls -A out)"
finish
