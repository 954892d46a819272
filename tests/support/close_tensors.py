#!/usr/bin/env python3
"""Exit 0 when two safetensors checkpoints (files or directories) hold the same tensor names and
shapes and every F32/F64/BF16/F16 value agrees within ABS + REL * |reference|; other dtypes must
be byte-equal. On a difference, prints the first tensor and values that disagree. Standard
library only.

    close_tensors.py CANDIDATE REFERENCE [--abs 1e-6] [--rel 1e-5] [--reference-names] [--max-mismatch F]

With --max-mismatch F, up to a fraction F of all entries may differ (counted and printed): where
the two tools legitimately choose differently (entries tied in magnitude at a TIES threshold).

With --reference-names, the candidate may hold more tensors than the reference (mergekit leaves
out tensors its architecture tables do not list, such as the biases of a Llama with
attention_bias); the reference's must all be there.
"""
import struct
import sys

from safetensors_files import tensors  # beside this script


def values(dtype, data):
    if dtype == "F32":
        return struct.unpack("<%df" % (len(data) // 4), data)
    if dtype == "F64":
        return struct.unpack("<%dd" % (len(data) // 8), data)
    if dtype == "F16":
        return struct.unpack("<%de" % (len(data) // 2), data)
    if dtype == "BF16":
        halves = struct.unpack("<%dH" % (len(data) // 2), data)
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
    return None


args = sys.argv[1:]
absolute, relative = 1e-6, 1e-5
if "--abs" in args:
    absolute = float(args[args.index("--abs") + 1])
if "--rel" in args:
    relative = float(args[args.index("--rel") + 1])
allowed = float(args[args.index("--max-mismatch") + 1]) if "--max-mismatch" in args else 0.0
mismatches = entries = 0
a, b = tensors(args[0]), tensors(args[1])
if "--reference-names" in args and set(b) <= set(a):
    a = {name: a[name] for name in b}
if set(a) != set(b):
    print("close_tensors: names differ: only in %s: %s; only in %s: %s"
          % (args[0], sorted(set(a) - set(b))[:5], args[1], sorted(set(b) - set(a))[:5]), file=sys.stderr)
    sys.exit(1)
for name in sorted(a):
    (dtype_a, shape_a, data_a), (dtype_b, shape_b, data_b) = a[name], b[name]
    if shape_a != shape_b:
        print("close_tensors: '%s': shape %s against %s" % (name, shape_a, shape_b), file=sys.stderr)
        sys.exit(1)
    va, vb = values(dtype_a, data_a), values(dtype_b, data_b)
    if va is None or vb is None:
        if data_a != data_b or dtype_a != dtype_b:
            print("close_tensors: '%s' (%s) differs" % (name, dtype_a), file=sys.stderr)
            sys.exit(1)
        continue
    for x, y in zip(va, vb):
        if abs(x - y) > absolute + relative * abs(y):
            if allowed == 0:
                print("close_tensors: '%s': %r against %r" % (name, x, y), file=sys.stderr)
                sys.exit(1)
            mismatches += 1
    entries += len(vb)
if mismatches > allowed * entries:
    print("close_tensors: %d of %d entries differ (more than a fraction %g)" % (mismatches, entries, allowed), file=sys.stderr)
    sys.exit(1)
print("close_tensors: %d tensors agree within %g + %g * |reference|%s"
      % (len(a), absolute, relative, " but %d of %d entries" % (mismatches, entries) if mismatches else ""))
