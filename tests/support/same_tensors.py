#!/usr/bin/env python3
"""Exit 0 when two safetensors checkpoints (files, or directories of shards with their index)
hold the same tensors byte for byte (names, dtypes, shapes, data; metadata may differ), and at
least one; with --require-prefix P, also a tensor whose name starts with P. On a difference, says
which tensor. Python's standard library only.

    same_tensors.py A B [--require-prefix P]
"""
import sys

from safetensors_files import tensors  # beside this script


a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
prefix = sys.argv[4] if len(sys.argv) == 5 and sys.argv[3] == "--require-prefix" else None
ok = a == b and len(a) > 0 and (prefix is None or any(name.startswith(prefix) for name in a))
if a != b:
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            describe = lambda t: "missing" if t is None else "%s %s %s" % (t[0], t[1], t[2][:16].hex())
            print("same_tensors: '%s' differs: %s against %s" % (name, describe(a.get(name)), describe(b.get(name))), file=sys.stderr)
            break
sys.exit(0 if ok else 1)
