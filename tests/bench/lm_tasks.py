#!/usr/bin/env python3
"""Token data for the language-model regime probe (tests/bench/lm_regime.sh): a small synthetic
language, pretraining corpora for two "releases", and three downstream tasks whose answers are
completions scored token by token. Standard library only; written as gradfix's token data
(safetensors, input_ids and labels I64 [N, T]; label -100 where no loss is taken).

    lm_tasks.py corpus PATH SAMPLES SEED MIX     pretraining text: a mixture of the language's
                                                 sentence kinds, MIX the weight of the
                                                 copy-like kinds against the counting ones
    lm_tasks.py task NAME PATH SAMPLES SEED      a downstream task, loss on the answer only:
                                                 reverse (four letters, reversed after '>'),
                                                 parity (four digits, E or O after '?' for the
                                                 parity of the last: a lookup answered by one
                                                 token), add (a + b = (a + b) mod 10)

The vocabulary (64 ids): 0 padding, 1-10 the digits, 11-36 the letters a-z, 37 '>', 38 '?',
39 '+', 40 '=', 41 '|' (a separator), 42 'E', 43 'O'; the rest unused."""
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support"))
from token_data import write_token_file  # noqa: E402 (tests/support, beside the test scripts)

LENGTH = 16
DIGIT, LETTER = 1, 11
GT, QUESTION, PLUS, EQUALS, BAR, EVEN, ODD = 37, 38, 39, 40, 41, 42, 43


def write(path, rows):
    """rows: (ids, labels) pairs, each padded to LENGTH (padding: id 0, label -100)."""
    ids, labels = [], []
    for row_ids, row_labels in rows:
        pad = LENGTH - len(row_ids)
        ids += row_ids + [0] * pad
        labels += row_labels + [-100] * pad
    write_token_file(path, ids, labels, len(rows), LENGTH)


def sentence(rng, mix):
    """One pretraining sentence: every position after the first is a target. The kinds teach the
    language's pieces (letters, digits, the symbols between them) without any task's rule."""
    kind = rng.random()
    if kind < mix / 2:
        # A letter run repeated after a bar: copying.
        run = [LETTER + rng.randrange(26) for _ in range(rng.randrange(2, 6))]
        row = run + [BAR] + run
    elif kind < mix:
        # Digits, then '?', then a letter: the symbols in use, the answers random.
        row = [DIGIT + rng.randrange(10) for _ in range(4)] + [QUESTION, rng.choice([EVEN, ODD])]
    elif kind < (1 + mix) / 2:
        # Counting up through the letters or the digits.
        if rng.random() < 0.5:
            start = rng.randrange(26)
            row = [LETTER + (start + k) % 26 for k in range(rng.randrange(5, 12))]
        else:
            start = rng.randrange(10)
            row = [DIGIT + (start + k) % 10 for k in range(rng.randrange(5, 12))]
    else:
        # Sums written out, with random results: the '+' and '=' in place, no arithmetic.
        row = [DIGIT + rng.randrange(10), PLUS, DIGIT + rng.randrange(10), EQUALS, DIGIT + rng.randrange(10), GT,
               LETTER + rng.randrange(26), LETTER + rng.randrange(26)]
    row = row[:LENGTH]
    return row, [-100] + row[1:]


def example(name, rng):
    """A task's prompt and answer; the loss (and the accuracy) is on the answer only."""
    if name == "reverse":
        letters = [LETTER + rng.randrange(26) for _ in range(4)]
        prompt, answer = letters + [GT], letters[::-1]
    elif name == "parity":
        digits = [rng.randrange(10) for _ in range(4)]
        prompt, answer = [DIGIT + d for d in digits] + [QUESTION], [EVEN if digits[-1] % 2 == 0 else ODD]
    elif name == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        prompt, answer = [DIGIT + a, PLUS, DIGIT + b, EQUALS], [DIGIT + (a + b) % 10]
    else:
        sys.exit("unknown task %r: reverse, parity or add" % name)
    ids = prompt + answer
    return ids, [-100] * len(prompt) + answer


def main(argv):
    if len(argv) == 6 and argv[1] == "corpus":
        path, samples, seed, mix = argv[2], int(argv[3]), int(argv[4]), float(argv[5])
        rng = random.Random(seed)
        write(path, [sentence(rng, mix) for _ in range(samples)])
    elif len(argv) == 6 and argv[1] == "task":
        name, path, samples, seed = argv[2], argv[3], int(argv[4]), int(argv[5])
        rng = random.Random(seed)
        write(path, [example(name, rng) for _ in range(samples)])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
