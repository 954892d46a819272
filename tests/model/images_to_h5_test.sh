#!/usr/bin/env bash
# launch/images-to-h5: an ImageFolder tree -> preprocessed images for CLIP. Bad trees are refused
# with exit 2 before any package is needed; where this Python has Pillow and numpy (never
# installed by the test suite) a tree of hand-made PPM images is converted and checked against
# the preprocessing computed here by hand, and gradfix eval reads the file with the CLIP fixture.
#   images_to_h5_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
tool=$repo/launch/images-to-h5
export GRADFIX=$gradfix
work=$(mktemp -d /tmp/gradfix-images-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

expect_bad() {  # expect_bad DESCRIPTION PATTERN ARGS...
  local description=$1 pattern=$2
  shift 2
  expect_exit2 "$description" "$pattern" "$tool" "$@" --no-install
  check "$description: nothing written" test ! -e bad.h5
}
mkdir empty_tree
expect_bad "a tree without class folders" "empty_tree: no class folders" --images empty_tree --out bad.h5
mkdir -p no_images/cat
expect_bad "a class without images" "no_images/cat: no images" --images no_images --out bad.h5

# Two classes of 16x16 PPM images (P6, written here), converted at size 16: no resize, no crop, so
# every value is (byte / 255 - mean) / std exactly.
python3 - <<'PY'
import os
for label, name in enumerate(["bird", "cat"]):
    os.makedirs(os.path.join("tree", name), exist_ok=True)
    for k in range(2):
        pixels = bytes(((label * 97 + k * 31 + i * 7) % 256) for i in range(16 * 16 * 3))
        with open(os.path.join("tree", name, "%d.ppm" % k), "wb") as f:
            f.write(b"P6\n16 16\n255\n" + pixels)
PY
expect_bad "a model without preprocessor_config.json" "no preprocessor_config.json" --images tree --model "$repo/tests/fixtures/clip/model" --out bad.h5
if ! python3 -c "import PIL, numpy" 2>/dev/null; then
  echo "SKIPPED: converting images (this python3 has no Pillow/numpy; launch/images-to-h5 would install them into a venv)"
  finish
  exit
fi
"$tool" --images tree --size 16 --out images.h5 --classes-out classes.txt --no-install >tool.log
check "the tree is converted" grep -q "images-to-h5: 4 images of 2 classes, 16x16, written to images.h5" tool.log
check "the class names, in label order" test "$(cat classes.txt)" = "$(printf 'bird\ncat')"
"$gradfix" convert images.h5 back.safetensors >/dev/null
check "inputs are the normalised pixels and labels the folders" python3 - <<'PY'
import json, struct
raw = open("back.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
begin, end = header["inputs"]["data_offsets"]
values = struct.unpack("<%df" % ((end - begin) // 4), raw[8 + n + begin:8 + n + end])
begin, end = header["labels"]["data_offsets"]
labels = struct.unpack("<4q", raw[8 + n + begin:8 + n + end])
assert header["inputs"]["shape"] == [4, 3, 16, 16] and list(labels) == [0, 0, 1, 1], (header, labels)
mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
for sample, (label, k) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    for c in range(3):
        for y in range(16):
            for x in range(16):
                byte = (label * 97 + k * 31 + ((y * 16 + x) * 3 + c) * 7) % 256
                want = (byte / 255.0 - mean[c]) / std[c]
                got = values[((sample * 3 + c) * 16 + y) * 16 + x]
                assert abs(got - want) < 1e-5, (sample, c, y, x, got, want)
PY
check "gradfix eval reads them with the CLIP fixture" "$gradfix" eval --weights "$repo/tests/fixtures/clip/model" \
  --head "$repo/tests/fixtures/clip/head.safetensors" --data images.h5 --results float.json
# --uint8: the same pixels, unnormalised, [N, H, W, 3]: a quarter of the file, and gradfix's own
# normalisation gives the same per-sample losses.
"$tool" --images tree --size 16 --uint8 --out bytes.h5 --no-install >/dev/null
"$gradfix" convert bytes.h5 bytes.safetensors >/dev/null
check "--uint8 stores the pixels as they are, [4, 16, 16, 3] U8" python3 - <<'PY'
import json, struct
raw = open("bytes.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
assert header["inputs"]["dtype"] == "U8" and header["inputs"]["shape"] == [4, 16, 16, 3], header
begin, end = header["inputs"]["data_offsets"]
data = raw[8 + n + begin:8 + n + end]
for sample, (label, k) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    for i in range(16 * 16 * 3):
        assert data[sample * 768 + i] == (label * 97 + k * 31 + i * 7) % 256, (sample, i)
PY
"$gradfix" eval --weights "$repo/tests/fixtures/clip/model" --head "$repo/tests/fixtures/clip/head.safetensors" --data bytes.h5 \
  --results bytes.json >/dev/null
check "eval of the uint8 file equals eval of the float file (1e-5)" python3 -c "
import json
a, b = json.load(open('float.json'))['per_sample_loss'], json.load(open('bytes.json'))['per_sample_loss']
assert all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)"
finish
