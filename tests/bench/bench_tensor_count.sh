#!/usr/bin/env bash
# Checkpoints of many small tensors (a mixture of experts has tens of thousands): wall time of
# inspect, convert, mask and apply at 1,000, 10,000 and 100,000 tensors of 2 floats each, and the
# time per thousand tensors, which stays flat when the work is linear in the tensor count.
# Prints a table and writes a JSON copy.
#   tests/bench/bench_tensor_count.sh [GRADFIX_BINARY] [JSON]
set -euo pipefail
if [[ "${1:-}" == -* ]] || [ $# -gt 2 ]; then
  echo "usage: tests/bench/bench_tensor_count.sh [GRADFIX_BINARY] [JSON]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=${1:-$root/build/gradfix}
json=${2:-bench_tensor_count.json}
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-/tmp}/gradfix-bench-count-XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
printf '# gradfix bench_tensor_count: tensors of 2 floats, %s cores\n' "$(nproc)"
printf '# %8s %8s %10s %14s\n' tensors op "time(s)" "ms/1k tensors"
rows=""
for count in 1000 10000 100000; do
  python3 - "$count" <<'PY'
import json, struct, sys
n = int(sys.argv[1])
header, offset = {}, 0
for i in range(n):
    header["model.layers.%d.experts.%d.w" % (i // 1000, i % 1000)] = {"dtype": "F32", "shape": [2], "data_offsets": [offset, offset + 8]}
    offset += 8
text = json.dumps(header).encode(); text += b" " * ((8 - len(text) % 8) % 8)
values = struct.pack("<%df" % (2 * n), *[(i % 7) - 3.0 for i in range(2 * n)])
open("a.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + values)
PY
  for op in inspect convert mask apply; do
    case $op in
      inspect) command=(inspect a.safetensors) ;;
      convert) command=(convert a.safetensors b.safetensors) ;;
      mask) command=(mask --task-vector a.safetensors --signs a.safetensors --out m.safetensors) ;;
      apply) command=(apply --base a.safetensors --task-vector a.safetensors --alpha 2 --out p.safetensors) ;;
    esac
    start=$(date +%s.%N)
    "$gradfix" "${command[@]}" >/dev/null
    end=$(date +%s.%N)
    time=$(awk "BEGIN { print $end - $start }")
    per=$(awk "BEGIN { print 1000 * $time / ($count / 1000) }")
    printf '  %8d %8s %10.2f %14.2f\n' "$count" "$op" "$time" "$per"
    rows+="${rows:+,}{\"tensors\":$count,\"op\":\"$op\",\"seconds\":$time}"
  done
  # The timed outputs must be right: apply with alpha 2 is 3a, mask of a by itself keeps a.
  python3 - "$count" <<'PY'
import json, struct, sys
def values(path):
    raw = open(path, "rb").read(); n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n]); header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        b, e = entry["data_offsets"]; out[name] = struct.unpack("<%df" % ((e - b) // 4), raw[8 + n + b:8 + n + e])
    return out
a, p, m = values("a.safetensors"), values("p.safetensors"), values("m.safetensors")
assert len(a) == int(sys.argv[1]) == len(p) == len(m)
assert all(p[k] == tuple(3 * x for x in a[k]) for k in a), "apply gave wrong values"
assert all(m[k] == a[k] for k in a), "mask gave wrong values"
PY
  rm -f ./*.safetensors
done
cd - >/dev/null
printf '{"benchmark":"bench_tensor_count","cores":%s,"rows":[%s]}\n' "$(nproc)" "$rows" >"$json"
echo "# JSON copy: $json"
