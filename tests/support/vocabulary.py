#!/usr/bin/env python3
"""Exit 0 when two model directories have the same vocabulary: tokenizer.json's tokens and ids
(the tokenizer model's vocabulary and the added tokens, with their special and normalized
flags), and config.json's vocab_size. With --template TEXT, the candidate's chat_template.jinja
must contain TEXT (and tokenizer_config.json carry no other template).

    vocabulary.py CANDIDATE REFERENCE [--template TEXT]
"""
import json
import os
import sys


def vocabulary(directory):
    with open(os.path.join(directory, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    vocab = tokenizer["model"]["vocab"]
    tokens = dict(vocab) if isinstance(vocab, dict) else {entry[0]: i for i, entry in enumerate(vocab)}
    added = {}
    for entry in tokenizer.get("added_tokens", []):
        tokens[entry["content"]] = entry["id"]
        added[entry["id"]] = (entry["content"], entry.get("special"), entry.get("normalized"))
    with open(os.path.join(directory, "config.json")) as f:
        rows = json.load(f).get("vocab_size")
    return tokens, added, rows


def main():
    candidate, reference = sys.argv[1], sys.argv[2]
    template = sys.argv[sys.argv.index("--template") + 1] if "--template" in sys.argv else None
    a, b = vocabulary(candidate), vocabulary(reference)
    for what, x, y in (("tokens", a[0], b[0]), ("added tokens", a[1], b[1]), ("config.json vocab_size", a[2], b[2])):
        if x != y:
            if isinstance(x, dict):
                only_x = sorted(set(x.items()) - set(y.items()), key=str)[:5]
                only_y = sorted(set(y.items()) - set(x.items()), key=str)[:5]
                print("vocabulary: %s differ: only in %s: %s; only in %s: %s" % (what, candidate, only_x, reference, only_y))
            else:
                print("vocabulary: %s differ: %s against %s" % (what, x, y))
            return 1
    if template is not None:
        path = os.path.join(candidate, "chat_template.jinja")
        if not os.path.exists(path) or template not in open(path).read():
            print("vocabulary: %s has no chat_template.jinja holding %r" % (candidate, template))
            return 1
        config = os.path.join(candidate, "tokenizer_config.json")
        if os.path.exists(config) and "chat_template" in json.load(open(config)):
            print("vocabulary: %s/tokenizer_config.json still has a chat_template" % candidate)
            return 1
    print("vocabulary: %d tokens (%d added), vocab_size %s, the same" % (len(a[0]), len(a[1]), a[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
