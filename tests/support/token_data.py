#!/usr/bin/env python3
"""Token data for the decoder tests, written as safetensors with Python's standard library.

    token_data.py PATH SAMPLES LENGTH SEED            counting: each sequence counts upwards mod 96
                                                      from a random start (a task a small decoder
                                                      can learn), loss on every next token
    token_data.py PATH SAMPLES LENGTH SEED --random V  uniform random ids below V (benchmarks)

input_ids and labels are I64 [SAMPLES, LENGTH]; the first position of each sequence is not a
target (label -100)."""
import json
import random
import struct
import sys


def main(argv):
    if len(argv) not in (5, 7) or (len(argv) == 7 and argv[5] != "--random"):
        sys.exit(__doc__)
    path, samples, length, seed = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    vocabulary = int(argv[6]) if len(argv) == 7 else None
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(samples):
        if vocabulary is None:
            start = rng.randrange(96)
            row = [(start + k) % 96 for k in range(length)]
        else:
            row = [rng.randrange(vocabulary) for _ in range(length)]
        ids += row
        labels += [-100] + row[1:]
    write_token_file(path, ids, labels, samples, length)


def write_token_file(path, ids, labels, samples, length):
    """Writes flat input_ids and labels (SAMPLES x LENGTH each, row by row) as I64 safetensors."""
    size = 8 * samples * length
    header = {"input_ids": {"dtype": "I64", "shape": [samples, length], "data_offsets": [0, size]},
              "labels": {"dtype": "I64", "shape": [samples, length], "data_offsets": [size, 2 * size]}}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text + struct.pack("<%dq" % len(ids), *ids) + struct.pack("<%dq" % len(labels), *labels))


if __name__ == "__main__":
    main(sys.argv)
