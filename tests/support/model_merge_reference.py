#!/usr/bin/env python3
"""Brute-force reference for gradfix's whole-model merges (mergekit's rules) with gradfix's
normal gradient-sign masks, written from the definitions in docs/merging.md with Python's
standard library. Exit 0 when CANDIDATE (a checkpoint gradfix wrote) agrees with the reference
within 1e-6 + 1e-5 |reference| everywhere; prints the first disagreement otherwise.

    model_merge_reference.py CANDIDATE --base DIR --method task_arithmetic|ties
        --model DIR:WEIGHT:DENSITY[:SIGNS] [...] [--lambda L] [--normalize 0|1]
        [--order none|mask-then-merge|merge-then-mask]

Definitions: delta_m = M_m - base rounded to float32 (mergekit subtracts in float32). The normal
mask keeps an entry of a vector where its sign equals the statistic's sign (a zero statistic drops
it). ties keeps exactly k = max(1, int(density * n)) entries of each (masked) delta per tensor,
the largest magnitudes, ties at the threshold to the earliest index; elects the sign of
sum_m w_m delta_m (+ when 0); mixes the agreeing weighted entries, divided by the sum of their
weights when normalising (1 where none agree). task_arithmetic mixes sum_m w_m delta_m, divided by
sum_m w_m when normalising. merge-then-mask masks the mixed delta with sum_m sign(s_m). The
result is base + lambda * mixed.
"""
import argparse
import math
import struct
import sys

from safetensors_files import tensors  # beside this script


def floats(entry):
    dtype, _, data = entry
    if dtype != "F32":
        sys.exit("the reference reads F32 tensors only, got %s" % dtype)
    return struct.unpack("<%df" % (len(data) // 4), data)


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def sign(x):
    return (x > 0) - (x < 0)


def masked(values, statistics):
    return [v if s != 0 and sign(v) == sign(s) else 0.0 for v, s in zip(values, statistics)]


def trimmed(values, density):
    n = len(values)
    k = n if density >= 1 else (0 if density <= 0 else max(1, int(density * n)))
    keep = set(sorted(range(n), key=lambda i: (-abs(values[i]), i))[:k])
    return [v if i in keep else 0.0 for i, v in enumerate(values)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("candidate")
    parser.add_argument("--base", required=True)
    parser.add_argument("--method", required=True, choices=["task_arithmetic", "ties"])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--lambda", dest="scale", type=float, default=1.0)
    parser.add_argument("--normalize", type=int, default=1)
    parser.add_argument("--order", default="none", choices=["none", "mask-then-merge", "merge-then-mask"])
    args = parser.parse_args()
    base = tensors(args.base)
    candidate = tensors(args.candidate)
    models = []
    for spec in args.model:
        parts = spec.split(":")
        models.append((tensors(parts[0]), float(parts[1]), float(parts[2]), tensors(parts[3]) if len(parts) > 3 else None))
    worst = 0.0
    for name in sorted(base):
        b = floats(base[name])
        weighted, weights, statistics = [], [], []
        for tuned, weight, density, signs in models:
            delta = [f32(t - x) for t, x in zip(floats(tuned[name]), b)]
            if args.order != "none":
                statistics.append(floats(signs[name]))
            if args.order == "mask-then-merge":
                delta = masked(delta, statistics[-1])
            if args.method == "ties":
                delta = trimmed(delta, density)
            weighted.append([weight * d for d in delta])
            weights.append(weight)
        mixed = []
        for i in range(len(b)):
            column = [w[i] for w in weighted]
            if args.method == "ties":
                elected = 1 if sum(column) >= 0 else -1
                agreeing = [(v, w) for v, w in zip(column, weights) if sign(v) == elected]
                total = sum(v for v, _ in agreeing)
                divisor = sum(w for _, w in agreeing) or 1.0
            else:
                total = sum(column)
                divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
            mixed.append(total / divisor if args.normalize else total)
        if args.order == "merge-then-mask":
            summed = [sum(sign(s[i]) for s in statistics) for i in range(len(b))]
            mixed = masked([f32(m) for m in mixed], summed)
        got = floats(candidate[name])
        for i, (x, m) in enumerate(zip(b, mixed)):
            expected = x + args.scale * m
            error = abs(got[i] - expected)
            if error > 1e-6 + 1e-5 * abs(expected):
                sys.exit("%s[%d]: candidate %r, reference %r" % (name, i, got[i], expected))
            worst = max(worst, error)
    print("agrees with the reference; largest difference %.3g" % worst)


if __name__ == "__main__":
    main()
