#!/usr/bin/env python3
"""The transport of `gradfix transport --no-few-shot-baseline` on a built-in MLP, written directly
in PyTorch: the baseline of tests/bench/bench_pytorch_transport.sh.

    pytorch_transport.py --target B.safetensors --task-vector TAU.safetensors \
        --data-dir FASHION_MNIST --transform contrast:0.5 --shots SHOTS.txt --support SUPPORT.txt \
        --alphas 0.1,0.25,... --sign-mode max --results OUT.json

The same models (safetensors files gradfix wrote), the same shots and support set (the indices
gradfix transport saved with --save-indices and --save-support, into the training images), the
same steps in the same order: B zero-shot on the test set; the naive row (B + alpha tau, alpha
chosen by the support set's accuracy, the earlier alpha on ties); the GradFix row (sign
statistics on the shots: per-sample votes in max mode, the summed gradient in mean mode; the
normal mask; the alpha search; the test set); <g, d> of both rows with g the shots' mean
gradient. What a PyTorch user would write: torch.func for the per-sample gradients, a state dict
per alpha. Only the MLPs of `gradfix init --arch mlp` and the transforms none and contrast:F.
"""
import argparse
import gzip
import json
import os
import struct
import sys
import time

started = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

imported = time.perf_counter()


def fail(message):
    print("pytorch_transport.py: " + message, file=sys.stderr)
    sys.exit(2)


def read_safetensors(path):
    # The format: an 8-byte little-endian header length, a JSON header, then the tensors' bytes.
    with open(path, "rb") as handle:
        data = handle.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] != "F32":
            fail("%s: tensor %s is %s; only F32 is read here" % (path, name, entry["dtype"]))
        begin, end = entry["data_offsets"]
        values = np.frombuffer(data, dtype="<f4", count=(end - begin) // 4, offset=8 + length + begin)
        tensors[name] = torch.from_numpy(values.reshape(entry["shape"]).copy())
    return tensors


def read_idx(path):
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(directory, split, transform):
    images = read_idx(os.path.join(directory, split + "-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(directory, split + "-labels-idx1-ubyte.gz"))
    inputs = images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)
    if transform.startswith("contrast:"):
        # gradfix's contrast: each image pulled towards its mean (summed in double, in order).
        factor = float(transform.split(":", 1)[1])
        mean = np.cumsum(inputs, axis=1, dtype=np.float64)[:, -1:] / inputs.shape[1]
        inputs = np.clip(mean + factor * (inputs.astype(np.float64) - mean), 0.0, 1.0).astype(np.float32)
    elif transform != "none":
        fail("transform %r: only none and contrast:F are written here" % transform)
    return torch.from_numpy(inputs), torch.from_numpy(labels.astype(np.int64))


class Mlp(torch.nn.Module):
    """gradfix's built-in MLP: Linear layers named layers.{i}, ReLU between them."""

    def __init__(self, weights):
        super().__init__()
        count = len([name for name in weights if name.endswith(".weight")])
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(weights["layers.%d.weight" % i].shape[1], weights["layers.%d.weight" % i].shape[0]) for i in range(count))
        self.load_state_dict(weights)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


@torch.no_grad()
def evaluate(model, inputs, labels, batch=1024):
    loss, correct = 0.0, 0
    for start in range(0, len(inputs), batch):
        logits = model(inputs[start:start + batch])
        loss += F.cross_entropy(logits, labels[start:start + batch], reduction="sum").item()
        correct += (logits.argmax(1) == labels[start:start + batch]).sum().item()
    return correct / len(inputs), loss / len(inputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--task-vector", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--transform", default="none")
    parser.add_argument("--shots", required=True)
    parser.add_argument("--support", required=True)
    parser.add_argument("--alphas", required=True)
    parser.add_argument("--sign-mode", default="max", choices=("max", "mean"))
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]

    base = read_safetensors(args.target)
    tau = read_safetensors(args.task_vector)
    pool_x, pool_y = load_split(args.data_dir, "train", args.transform)
    test_x, test_y = load_split(args.data_dir, "t10k", args.transform)
    shots = torch.tensor([int(line) for line in open(args.shots) if line.strip()])
    support = torch.tensor([int(line) for line in open(args.support) if line.strip()])
    model = Mlp(base)
    model.eval()
    shots_x, shots_y, support_x, support_y = pool_x[shots], pool_y[shots], pool_x[support], pool_y[support]
    loaded = time.perf_counter()

    params = {name: value.detach() for name, value in model.named_parameters()}

    def sample_loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    def mean_gradient():
        model.zero_grad()
        F.cross_entropy(model(shots_x), shots_y).backward()
        return {name: value.grad.detach().clone() for name, value in model.named_parameters()}

    # Statistics: per-sample votes sum_i sign(-grad_i) (max) or the summed -gradient (mean).
    if args.sign_mode == "max":
        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, shots_x, shots_y)
        statistics = {name: torch.sign(-g).sum(0) for name, g in per_sample.items()}
        g = mean_gradient()
    else:
        g = mean_gradient()
        statistics = {name: -value * len(shots) for name, value in g.items()}
    masked = {name: torch.where(torch.sign(tau[name]) == torch.sign(statistics[name]), tau[name], torch.zeros_like(tau[name]))
              for name in base}

    def search(delta):
        accuracies, curve = [], []
        for alpha in alphas:
            model.load_state_dict({name: base[name] + alpha * delta[name] for name in base})
            accuracy, loss = evaluate(model, support_x, support_y)
            accuracies.append(accuracy)
            curve.append({"alpha": alpha, "support_loss": loss, "shots_loss": evaluate(model, shots_x, shots_y)[1]})
        best = max(range(len(alphas)), key=lambda i: (accuracies[i], -i))  # ties: the earlier alpha
        model.load_state_dict({name: base[name] + alphas[best] * delta[name] for name in base})
        accuracy, loss = evaluate(model, test_x, test_y)
        model.load_state_dict(base)
        derivative = sum(float((g[name].double() * delta[name].double()).sum()) for name in base)
        return {"alpha": alphas[best], "test_accuracy": accuracy, "test_loss": loss, "directional_derivative": derivative,
                "alpha_curve": curve}

    rows = []
    accuracy, loss = evaluate(model, test_x, test_y)
    rows.append({"method": "B zero-shot", "test_accuracy": accuracy, "test_loss": loss})
    rows.append(dict(method="B + alpha tau_A (naive)", **search(tau)))
    kept = sum(int((masked[name] != 0).sum()) for name in base) / max(1, sum(int((tau[name] != 0).sum()) for name in base))
    rows.append(dict(method="GradFix (%s, normal)" % args.sign_mode, kept=kept, **search(masked)))
    finished = time.perf_counter()

    results = {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "seconds": {"import": imported - started, "inputs": loaded - imported, "transport": finished - loaded}}
    with open(args.results + ".tmp", "w") as handle:
        json.dump(results, handle, indent=2)
    os.replace(args.results + ".tmp", args.results)


if __name__ == "__main__":
    main()
