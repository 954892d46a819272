#!/usr/bin/env bash
# A sweep over 8 mask modes x 3 seeds on a generated Llama-type decoder, run twice in the same
# run: with the statistics cache (what a sweep does by default: OUT/statistics) and without it
# (statistics-cache set empty). Prints the gradient passes each ran, their wall times and the
# ratio, and writes a JSON copy. The two tables must be equal (but the cache's line), or the run
# stops.
#   tests/bench/bench_sweep_cache.sh [GRADFIX_BINARY] [JSON] [HIDDEN LAYERS INTERMEDIATE VOCAB] [SHOTS TOKENS]
set -euo pipefail
if [[ "${1:-}" == -* ]] || [ $# -gt 8 ]; then
  echo "usage: tests/bench/bench_sweep_cache.sh [GRADFIX_BINARY] [JSON] [HIDDEN LAYERS INTERMEDIATE VOCAB] [SHOTS TOKENS]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=$(realpath "${1:-$root/build/gradfix}")
json=$(realpath -m "${2:-bench_sweep_cache.json}")
hidden=${3:-256} layers=${4:-8} intermediate=${5:-704} vocab=${6:-8000}
shots=${7:-16} tokens=${8:-64}
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-/tmp}/gradfix-bench-sweep-XXXXXX")
trap '[ -n "${GRADFIX_BENCH_KEEP:-}" ] || rm -rf "$work"' EXIT
cd "$work"

python3 - "$hidden" "$layers" "$intermediate" "$vocab" "$tokens" <<'PY'
import json, random, struct, sys
hidden, layers, inter, vocab, tokens = map(int, sys.argv[1:])
heads = max(1, hidden // 64)
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "hidden_act": "silu", "torch_dtype": "float32"}, open("config.json", "w"), indent=2)
def write(path, samples, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(vocab) for _ in range(samples * tokens)]
    labels = [(-100 if t == 0 else ids[n * tokens + t]) for n in range(samples) for t in range(tokens)]
    size = 8 * len(ids)
    header = {"input_ids": {"dtype": "I64", "shape": [samples, tokens], "data_offsets": [0, size]},
              "labels": {"dtype": "I64", "shape": [samples, tokens], "data_offsets": [size, 2 * size]}}
    text = json.dumps(header).encode(); text += b" " * ((8 - len(text) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + struct.pack("<%dq" % len(ids), *ids) + struct.pack("<%dq" % len(labels), *labels))
write("pool.safetensors", 64, 1)
write("test.safetensors", 16, 2)
PY
"$gradfix" init --arch llama --config-file config.json --seed 1 --out B >/dev/null
"$gradfix" generate --like B --like-scale 1 --noise 0.01 --seed 5 --out A_ft >/dev/null
"$gradfix" taskvector --base B --finetuned A_ft --out tau.safetensors >/dev/null
bytes=$(du -cb B/*.safetensors | tail -1 | cut -f1)
cat >sweep.ini <<EOF
[sweep]
out = cached
tasks = random
mask-mode = normal,force,random,soft1,soft2,soft3,soft1_rowwise,soft2_rowwise
seed = 0,1,2
[transport]
target = B
task-vector = tau.safetensors
test-data = test.safetensors
num-samples = $shots
support-size = 16
alphas = 0.5,1
no-few-shot-baseline = true
[task.random]
data = pool.safetensors
EOF

calc() { awk "BEGIN { print $1 }"; }
run() {  # run OUT [--set ...]: prints the seconds
  local start end
  start=$(date +%s.%N)
  "$gradfix" sweep --config sweep.ini --set "sweep.out=$1" "${@:2}" >"$1.log" 2>&1 || { cat "$1.log" >&2; exit 1; }
  end=$(date +%s.%N)
  calc "$end - $start"
}
cached_time=$(run cached)
plain_time=$(run plain --set transport.statistics-cache=)
passes=$(grep -o "[0-9]* gradient passes ran" cached.log | grep -o "^[0-9]*")
reused=$(grep -o "[0-9]* of [0-9]* points reused" cached.log | grep -o "^[0-9]*")
points=$(ls cached/points/random/*.json | wc -l)
if ! diff <(grep -v "^# gradfix sweep" cached/table.md) <(grep -v "^# gradfix sweep" plain/table.md) >/dev/null; then
  echo "error: the tables with and without the cache differ: the measurement means nothing" >&2
  exit 1
fi
printf '# gradfix bench_sweep_cache: llama %s hidden, %s layers, %s intermediate, %s vocab: %s bytes fp32; %s shots x %s tokens; 8 mask modes x 3 seeds; %s cores\n' \
  "$hidden" "$layers" "$intermediate" "$vocab" "$bytes" "$shots" "$tokens" "$(nproc)"
printf '# %12s %8s %16s %10s %10s\n' sweep points "gradient passes" "time(s)" "vs plain"
printf '  %12s %8d %16d %10.1f %10.2f\n' "plain" "$points" "$((2 * points))" "$plain_time" 1
printf '  %12s %8d %16d %10.1f %10.2f\n' "cached" "$points" "$passes" "$cached_time" "$(calc "$cached_time / $plain_time")"
printf '# points that reused cached statistics: %s of %s; tables equal\n' "$reused" "$points"
cd - >/dev/null
printf '{"benchmark":"bench_sweep_cache","model_bytes":%s,"points":%s,"passes_plain":%s,"passes_cached":%s,"points_reused":%s,"seconds_plain":%s,"seconds_cached":%s}\n' \
  "$bytes" "$points" "$((2 * points))" "$passes" "$reused" "$plain_time" "$cached_time" >"$json"
echo "# JSON copy: $json"
