#!/usr/bin/env python3
"""Exit 0 when two sharded safetensors directories hold the same tensors byte for byte (names,
dtypes, shapes, data; metadata may differ), and at least one; with --require-prefix P, also a
tensor whose name starts with P. Python's standard library only.

    same_tensors.py DIR_A DIR_B [--require-prefix P]
"""
import json
import os
import struct
import sys


def tensors(directory):
    index = json.load(open(os.path.join(directory, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        raw = open(os.path.join(directory, shard), "rb").read()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            out[name] = (entry["dtype"], entry["shape"], raw[8 + n + begin:8 + n + end])
    return out


a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
prefix = sys.argv[4] if len(sys.argv) == 5 and sys.argv[3] == "--require-prefix" else None
ok = a == b and len(a) > 0 and (prefix is None or any(name.startswith(prefix) for name in a))
sys.exit(0 if ok else 1)
