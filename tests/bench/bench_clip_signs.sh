#!/usr/bin/env bash
# signs --sign-mode max on a generated CLIP ViT-B/16 vision tower (random weights, a Hugging Face
# clip_vision_model directory: 768 wide, 12 layers, 16 x 16 patches of 224 x 224 images, 86M
# parameters) with a random 10-class zero-shot head: time per sample of the batched per-sample
# products against one backward pass per sample (--method loop), measured in the same run, and
# peak resident memory per rank at P = 1, 2, 4 with the parameters sharded. Prints a table and
# writes a JSON copy. Every vote file must be byte-identical to the P = 1 fast one, or the run stops.
#   tests/bench/bench_clip_signs.sh [GRADFIX_BINARY] [JSON] [SAMPLES] [IMAGE_SIZE]
set -euo pipefail
if [[ "${1:-}" == -* ]] || [ $# -gt 4 ]; then
  echo "usage: tests/bench/bench_clip_signs.sh [GRADFIX_BINARY] [JSON] [SAMPLES] [IMAGE_SIZE]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=$(realpath "${1:-$root/build/gradfix}")
json=$(realpath -m "${2:-bench_clip_signs.json}")
samples=${3:-16} size=${4:-224}
flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-/tmp}/gradfix-bench-clip-XXXXXX")
trap '[ -n "${GRADFIX_BENCH_KEEP:-}" ] || rm -rf "$work"' EXIT
cd "$work"

# The config, the tensor list for `gradfix generate`, the head and the images.
python3 - "$samples" "$size" <<'PY'
import json, random, struct, sys
samples, size = map(int, sys.argv[1:])
hidden, layers, heads, inter, patch, projection, classes = 768, 12, 12, 3072, 16, 512, 10
tokens = 1 + (size // patch) ** 2
config = {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "hidden_size": hidden,
          "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads, "image_size": size,
          "patch_size": patch, "num_channels": 3, "projection_dim": projection, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
e = "vision_model.embeddings."
shapes = [e + "class_embedding=%d" % hidden, e + "patch_embedding.weight=%dx3x%dx%d" % (hidden, patch, patch),
          e + "position_embedding.weight=%dx%d" % (tokens, hidden), "vision_model.pre_layrnorm.weight=%d" % hidden,
          "vision_model.pre_layrnorm.bias=%d" % hidden]
for i in range(layers):
    p = "vision_model.encoder.layers.%d." % i
    for norm in ("layer_norm1", "layer_norm2"):
        shapes += [p + norm + ".weight=%d" % hidden, p + norm + ".bias=%d" % hidden]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes += [p + "self_attn.%s.weight=%dx%d" % (proj, hidden, hidden), p + "self_attn.%s.bias=%d" % (proj, hidden)]
    shapes += [p + "mlp.fc1.weight=%dx%d" % (inter, hidden), p + "mlp.fc1.bias=%d" % inter,
               p + "mlp.fc2.weight=%dx%d" % (hidden, inter), p + "mlp.fc2.bias=%d" % hidden]
shapes += ["vision_model.post_layernorm.weight=%d" % hidden, "vision_model.post_layernorm.bias=%d" % hidden,
           "visual_projection.weight=%dx%d" % (projection, hidden)]
json.dump(config, open("config.json", "w"), indent=2)
open("shapes.txt", "w").write(",".join(shapes))
rng = random.Random(1)
def write(path, tensors):
    header, body, offset = {}, b"", 0
    for name, dtype, shape, fmt, values in tensors:
        data = struct.pack("<%d%s" % (len(values), fmt), *values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        body += data
        offset += len(data)
    text = json.dumps(header).encode(); text += b" " * ((8 - len(text) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + body)
write("head.safetensors", [("head", "F32", [classes, projection], "f", [rng.gauss(0, 1) for _ in range(classes * projection)]),
                           ("logit_scale", "F32", [], "f", [4.6052])])
write("images.safetensors", [("inputs", "F32", [samples, 3, size, size], "f", [rng.gauss(0, 1) for _ in range(samples * 3 * size * size)]),
                             ("labels", "I64", [samples], "q", [n % classes for n in range(samples)])])
PY
# Every tensor N(0, 0.02), norms included: the arithmetic, not the accuracy, is what is measured.
mpirun "${flags[@]}" -np 2 "$gradfix" generate --shapes "$(cat shapes.txt)" --noise 0.02 --seed 1 --max-shard-size 200MB --out model >/dev/null
cp config.json model/
"$gradfix" convert images.safetensors images.h5 >/dev/null
bytes=$(du -cb model/*.safetensors | tail -1 | cut -f1)
parameters=$((bytes / 4))

calc() { awk "BEGIN { print $1 }"; }
run() {  # run RANKS METHOD OUT: prints the seconds and the largest rank's peak RSS in MiB
  local start end
  start=$(date +%s.%N)
  mpirun "${flags[@]}" -np "$1" "$gradfix" signs --weights model --head head.safetensors --data images.h5 --num-samples "$samples" \
    --sign-mode max --method "$2" --out "$3" --report-memory >run.log 2>&1 || { cat run.log >&2; exit 1; }
  end=$(date +%s.%N)
  echo "$(calc "$end - $start") $(grep "peak resident memory" run.log | tr ' ' '\n' | grep -E '^[0-9]+$' | sort -n | tail -1)"
}
printf '# gradfix bench_clip_signs: clip_vision_model ViT-B/16, %s x %s images, %s parameters (%s bytes fp32); %s samples; %s cores\n' \
  "$size" "$size" "$parameters" "$bytes" "$samples" "$(nproc)"
printf '# %6s %6s %10s %14s %14s %12s\n' method ranks "time(s)" "s/sample" "peak RSS(MiB)" "vs P=1 peak"
rows=""
first_peak=""
for ranks in 1 2 4; do
  read -r time peak < <(run "$ranks" fast "votes_$ranks.safetensors")
  [ -n "$first_peak" ] || first_peak=$peak
  if [ "$ranks" -gt 1 ] && ! cmp -s votes_1.safetensors "votes_$ranks.safetensors"; then
    echo "error: votes at $ranks ranks differ from 1 rank: the measurement means nothing" >&2
    exit 1
  fi
  ratio=$(calc "$peak / $first_peak")
  printf '  %6s %6d %10.1f %14.3f %14d %12.2f\n' fast "$ranks" "$time" "$(calc "$time / $samples")" "$peak" "$ratio"
  rows+="${rows:+,}{\"method\":\"fast\",\"ranks\":$ranks,\"seconds\":$time,\"peak_rss_mib\":$peak,\"peak_vs_p1\":$ratio}"
  [ "$ranks" -eq 1 ] && fast_time=$time
done
read -r time peak < <(run 1 loop votes_loop.safetensors)
if ! cmp -s votes_1.safetensors votes_loop.safetensors; then
  echo "note: loop votes differ from the fast ones in $(cmp -l votes_1.safetensors votes_loop.safetensors | wc -l) bytes (rounding near zero)" >&2
fi
printf '  %6s %6d %10.1f %14.3f %14d %12s\n' loop 1 "$time" "$(calc "$time / $samples")" "$peak" -
printf '# fast vs loop at 1 rank: %.2fx\n' "$(calc "$time / $fast_time")"
rows+=",{\"method\":\"loop\",\"ranks\":1,\"seconds\":$time,\"peak_rss_mib\":$peak}"
cd - >/dev/null
printf '{"benchmark":"bench_clip_signs","model":"clip_vision_model ViT-B/16","parameters":%s,"model_bytes":%s,"image_size":%s,"samples":%s,"cores":%s,"speedup_fast_vs_loop":%s,"rows":[%s]}\n' \
  "$parameters" "$bytes" "$size" "$samples" "$(nproc)" "$(calc "$time / $fast_time")" "$rows" >"$json"
echo "# JSON copy: $json"
