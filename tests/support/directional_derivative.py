#!/usr/bin/env python3
"""Checks a transport's reported first-order quantities against the files they come from, with
Python's standard library only. SIGNS is `gradfix signs --sign-mode mean` on the transport's
shots (S = the summed -gradients of N shots, so g = -S / N), MASKED is `gradfix mask` of TAU by
those statistics. Exit 0 when results.json's directional_derivative equals <g, MASKED> and its
naive_directional_derivative equals <g, TAU> (relative 1e-6), the first is <= 0, and it equals
-sum |g_i| |tau_i| over the kept entries (the paper's first-order descent guarantee).

    directional_derivative.py RESULTS.json SIGNS.safetensors MASKED.safetensors TAU.safetensors N
"""
import json
import struct
import sys


def read(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        fmt = {"F32": "f", "F64": "d"}[entry["dtype"]]
        out[name] = struct.unpack("<%d%s" % ((end - begin) // struct.calcsize(fmt), fmt), raw[8 + n + begin:8 + n + end])
    return out


results, signs, masked, tau, shots = json.load(open(sys.argv[1])), read(sys.argv[2]), read(sys.argv[3]), read(sys.argv[4]), int(sys.argv[5])
gradfix = naive = descent = 0.0
for name, s in signs.items():
    g = [-v / shots for v in s]
    m, t = masked[name], tau[name]
    gradfix += sum(a * b for a, b in zip(g, m))
    naive += sum(a * b for a, b in zip(g, t))
    descent -= sum(abs(a) * abs(b) for a, b, k in zip(g, t, m) if k != 0)


def close(a, b):
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-30)


reported, reported_naive = results["directional_derivative"], results["naive_directional_derivative"]
ok = close(reported, gradfix) and close(reported_naive, naive) and reported <= 0 and close(reported, descent)
print("reported %.9g (files %.9g, -sum|g||tau| %.9g), naive %.9g (files %.9g)" % (reported, gradfix, descent, reported_naive, naive))
sys.exit(0 if ok else 1)
