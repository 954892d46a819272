"""What a PyTorch user writes for GradFix's max votes on a Hugging Face decoder: the signs of each
sample's gradient of its mean next-token loss, summed. Two ways, timed on the same threads:
one autograd.grad per sample, and torch.func's vmap(grad) over chunks of samples. Used by
bench_vote_rate.sh; needs torch and transformers.

  python pytorch_votes.py MODEL_DIR TOKENS.safetensors THREADS OUT.json [GRADFIX_VOTES.safetensors]

Writes the times and, when gradfix's votes are given, the fraction of entries where they agree.
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def sample_loss(model, ids, labels):
    logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1].float()
    targets = labels[1:]
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)


def loop_votes(model, ids, labels):
    params = dict(model.named_parameters())
    votes = {name: torch.zeros_like(p, dtype=torch.int32) for name, p in params.items()}
    for n in range(ids.size(0)):
        grads = torch.autograd.grad(sample_loss(model, ids[n], labels[n]), list(params.values()))
        for (name, _), g in zip(params.items(), grads):
            votes[name] += torch.sign(-g).to(torch.int32)
    return votes


def vmap_votes(model, ids, labels, chunk):
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, one_ids, one_labels):
        logits = functional_call(model, p, (one_ids.unsqueeze(0),)).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, one_labels[1:], ignore_index=-100)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    votes = {name: torch.zeros_like(p, dtype=torch.int32) for name, p in params.items()}
    for start in range(0, ids.size(0), chunk):
        grads = per_sample(params, ids[start:start + chunk], labels[start:start + chunk])
        for name, g in grads.items():
            votes[name] += torch.sign(-g).to(torch.int32).sum(0)
    return votes


def main():
    model_dir, tokens, threads, out = sys.argv[1:5]
    reference = sys.argv[5] if len(sys.argv) > 5 else None
    torch.set_num_threads(int(threads))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    data = load_file(tokens)
    ids, labels = data["input_ids"], data["labels"]
    rows = []
    results = {}
    for way, run in [("per-sample loop", lambda: loop_votes(model, ids, labels)),
                     ("vmap(grad), chunks of 8", lambda: vmap_votes(model, ids, labels, 8))]:
        start = time.perf_counter()
        votes = run()
        seconds = time.perf_counter() - start
        results[way] = votes
        row = {"way": way, "seconds": seconds}
        if reference is not None:
            theirs = load_file(reference)
            equal = sum(int((theirs[name].to(torch.int32) == v).sum()) for name, v in votes.items())
            total = sum(v.numel() for v in votes.values())
            row["agreement_with_gradfix"] = equal / total
        rows.append(row)
        print("%s: %.2f s%s" % (way, seconds, "" if reference is None else ", votes equal gradfix's on %.5f of entries"
                                % row["agreement_with_gradfix"]), flush=True)
    json.dump({"torch": torch.__version__, "threads": int(threads), "rows": rows}, open(out, "w"), indent=2)


if __name__ == "__main__":
    main()
