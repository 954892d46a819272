"""Reads safetensors checkpoints with Python's standard library, for the test scripts: a file, a
directory of shards with model.safetensors.index.json, or a directory holding model.safetensors.
tensors(path) maps each name to (dtype, shape, raw bytes); the metadata is left out. f32(path) maps
each F32 tensor's name to (shape, values as a tuple of floats)."""
import json
import os
import struct


def tensors(path):
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            files = [os.path.join(path, f) for f in sorted(set(json.load(open(index))["weight_map"].values()))]
        else:
            files = [os.path.join(path, "model.safetensors")]
    else:
        files = [path]
    out = {}
    for name in files:
        raw = open(name, "rb").read()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            out[key] = (entry["dtype"], entry["shape"], raw[8 + n + begin:8 + n + end])
    return out


def f32(path):
    out = {}
    for key, (dtype, shape, data) in tensors(path).items():
        if dtype == "F32":
            out[key] = (shape, struct.unpack("<%df" % (len(data) // 4), data))
    return out
