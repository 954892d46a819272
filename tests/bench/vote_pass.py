"""A Llama-type decoder for the votes-pass benchmarks, and the arithmetic of gradfix's pass on it.

  python3 vote_pass.py write HIDDEN LAYERS INTER VOCAB HEADS KV SAMPLES TOKENS
      writes config.json, shapes.txt (for `gradfix generate`), tokens.safetensors and flops.json
      into the current directory

flops.json lists the pass's matrix products as (shape, floating-point operations) pairs, the
shape in gradfix_bench_matmul's notation, plus the attention's operations and the model's
bytes. The pass (docs/cluster.md) runs samples in groups of 8: a layer's products [8 T, in] x
[in, out] three times (forward, recomputation, the input's gradient) and one per-sample product
G_n^T X_n per sample; the head's four times over the vocabulary (the log-sum-exp scan, the
recomputed logits, the features' gradient, the per-sample products). Attention adds
2 x 2 T^2 (heads x d) per sample and layer forward, run twice, and twice that backward.
"""
import json
import math
import random
import struct
import sys

GROUP = 8


def linear_shapes(hidden, inter, heads, kv):
    d = hidden // heads
    return [(heads * d, hidden), (kv * d, hidden), (kv * d, hidden), (hidden, heads * d), (inter, hidden), (inter, hidden),
            (hidden, inter)]


def pass_flops(hidden, layers, inter, vocab, heads, kv, samples, tokens):
    groups = -(-samples // GROUP)
    rows = GROUP * tokens
    terms = []
    for out, inp in linear_shapes(hidden, inter, heads, kv):
        terms.append(("%dx%dx%d" % (rows, inp, out), 3 * 2 * rows * inp * out * groups * layers))
        terms.append(("%d@%dx%dx%d" % (GROUP, out, tokens, inp), 2 * out * tokens * inp * samples * layers))
    terms.append(("%dx%dx%d" % (rows, hidden, vocab), 3 * 2 * rows * hidden * vocab * groups))
    terms.append(("%d@%dx%dx%d" % (GROUP, vocab, tokens, hidden), 2 * vocab * tokens * hidden * samples))
    attention = (2 + 2 + 4) * 2 * tokens * tokens * hidden * samples * layers
    layer_parameters = sum(o * i for o, i in linear_shapes(hidden, inter, heads, kv)) + 2 * hidden
    parameters = layers * layer_parameters + 2 * vocab * hidden + hidden
    # Bytes gathered whole by a rank (the part others own travels): every layer twice (forward,
    # recomputation), the head twice (scan, gradient), the embedding rows of the data's distinct
    # tokens (about V (1 - exp(-N T / V)) of uniformly drawn ones) twice.
    used_rows = vocab * (1 - math.exp(-samples * tokens / vocab))
    gathered = 2 * 4 * layers * layer_parameters + 2 * 4 * vocab * hidden + 2 * 4 * used_rows * hidden
    return {"terms": terms, "attention": attention, "groups": groups, "model_bytes": 4 * parameters, "gathered_bytes": gathered}


def write(hidden, layers, inter, vocab, heads, kv, samples, tokens):
    d = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32"}
    shapes = ["model.embed_tokens.weight=%dx%d" % (vocab, hidden)]
    for i in range(layers):
        p = "model.layers.%d." % i
        shapes += [p + "input_layernorm.weight=%d" % hidden, p + "self_attn.q_proj.weight=%dx%d" % (heads * d, hidden),
                   p + "self_attn.k_proj.weight=%dx%d" % (kv * d, hidden), p + "self_attn.v_proj.weight=%dx%d" % (kv * d, hidden),
                   p + "self_attn.o_proj.weight=%dx%d" % (hidden, heads * d), p + "post_attention_layernorm.weight=%d" % hidden,
                   p + "mlp.gate_proj.weight=%dx%d" % (inter, hidden), p + "mlp.up_proj.weight=%dx%d" % (inter, hidden),
                   p + "mlp.down_proj.weight=%dx%d" % (hidden, inter)]
    shapes += ["model.norm.weight=%d" % hidden, "lm_head.weight=%dx%d" % (vocab, hidden)]
    json.dump(config, open("config.json", "w"), indent=2)
    open("shapes.txt", "w").write(",".join(shapes))
    rng = random.Random(1)
    ids = [rng.randrange(vocab) for _ in range(samples * tokens)]
    labels = [(-100 if t < 8 else ids[n * tokens + t]) for n in range(samples) for t in range(tokens)]
    header = {"input_ids": {"dtype": "I64", "shape": [samples, tokens], "data_offsets": [0, 8 * len(ids)]},
              "labels": {"dtype": "I64", "shape": [samples, tokens], "data_offsets": [8 * len(ids), 16 * len(ids)]}}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    open("tokens.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + struct.pack("<%dq" % len(ids), *ids) +
                                            struct.pack("<%dq" % len(labels), *labels))
    json.dump(pass_flops(hidden, layers, inter, vocab, heads, kv, samples, tokens), open("flops.json", "w"))


if __name__ == "__main__":
    if len(sys.argv) != 10 or sys.argv[1] != "write":
        sys.exit(__doc__)
    write(*map(int, sys.argv[2:]))
