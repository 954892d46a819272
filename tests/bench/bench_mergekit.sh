#!/usr/bin/env bash
# gradfix against mergekit on the same merges: a generated Llama-type model (~110M parameters,
# F32, a Hugging Face directory) and three fine-tunes of it (the base plus seeded noise), merged
# with ties (densities 0.5/0.7/0.3, weights 1/0.5/0.8), linear, and slerp (the base towards the
# first fine-tune, t = 0.3), from one mergekit YAML each:
# `gradfix merge --config` at P = 1 and 2 against `mergekit-yaml` (CPU, its defaults, no card or
# tokenizer) on the same file. Wall time and peak resident memory (the largest rank, from
# /usr/bin/time), ratios to mergekit and to the I/O floor (every input read once, the output
# written once with fsync) in the same run; the outputs must agree (close_tensors.py) or the run
# stops. Prints a table and writes a JSON copy.
#   tests/bench/bench_mergekit.sh MERGEKIT_YAML_BINARY [GRADFIX_BINARY] [JSON] [HIDDEN LAYERS INTERMEDIATE VOCAB]
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: tests/bench/bench_mergekit.sh MERGEKIT_YAML_BINARY [GRADFIX_BINARY] [JSON] [HIDDEN LAYERS INTERMEDIATE VOCAB]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
mergekit=$1
gradfix=$(realpath "${2:-$root/build/gradfix}")
json=$(realpath -m "${3:-bench_mergekit.json}")
hidden=${4:-768} layers=${5:-12} intermediate=${6:-2048} vocab=${7:-16000}
flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-/tmp}/gradfix-bench-mergekit-XXXXXX")
trap '[ -n "${GRADFIX_BENCH_KEEP:-}" ] || rm -rf "$work"' EXIT
cd "$work"

python3 - "$hidden" "$layers" "$intermediate" "$vocab" <<'PY'
import json, os, sys
hidden, layers, inter, vocab = map(int, sys.argv[1:])
heads, kv = 12, 4
head_dim = hidden // heads
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
          "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads, "head_dim": head_dim,
          "num_key_value_heads": kv, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32"}
shapes = ["model.embed_tokens.weight=%dx%d" % (vocab, hidden), "model.norm.weight=%d" % hidden, "lm_head.weight=%dx%d" % (vocab, hidden)]
for i in range(layers):
    p = "model.layers.%d." % i
    shapes += [p + "input_layernorm.weight=%d" % hidden, p + "post_attention_layernorm.weight=%d" % hidden,
               p + "self_attn.q_proj.weight=%dx%d" % (heads * head_dim, hidden), p + "self_attn.k_proj.weight=%dx%d" % (kv * head_dim, hidden),
               p + "self_attn.v_proj.weight=%dx%d" % (kv * head_dim, hidden), p + "self_attn.o_proj.weight=%dx%d" % (hidden, heads * head_dim),
               p + "mlp.gate_proj.weight=%dx%d" % (inter, hidden), p + "mlp.up_proj.weight=%dx%d" % (inter, hidden),
               p + "mlp.down_proj.weight=%dx%d" % (hidden, inter)]
open("shapes.txt", "w").write(",".join(shapes))
os.makedirs("base", exist_ok=True)
json.dump(config, open("base/config.json", "w"), indent=2)
models = "".join("  - model: ft%d\n    parameters: {weight: %s, density: %s}\n" % (i, w, d)
                 for i, (w, d) in enumerate([(1.0, 0.5), (0.5, 0.7), (0.8, 0.3)]))
open("ties.yml", "w").write("merge_method: ties\nbase_model: base\nmodels:\n%sdtype: float32\n" % models)
plain = "".join("  - model: ft%d\n    parameters: {weight: %s}\n" % (i, w) for i, w in enumerate([1.0, 0.5, 0.8]))
open("linear.yml", "w").write("merge_method: linear\nmodels:\n%sdtype: float32\n" % plain)
open("slerp.yml", "w").write("merge_method: slerp\nbase_model: base\nmodels:\n  - model: ft0\nparameters: {t: 0.3}\ndtype: float32\n")
PY
"$gradfix" generate --shapes "$(cat shapes.txt)" --noise 0.02 --seed 1 --out base/model.safetensors --quiet >/dev/null
for i in 0 1 2; do
  mkdir -p "ft$i" && cp base/config.json "ft$i/"
  "$gradfix" generate --like base --noise 0.002 --seed $((i + 2)) --out "ft$i/model.safetensors" --quiet >/dev/null
done
parameters=$("$gradfix" inspect base | tail -n +2 | grep -oE '^[0-9]+ tensors, [0-9]+ elements' | grep -oE '[0-9]+ elements' | grep -oE '[0-9]+')

# measure NAME COMMAND...: wall seconds and the peak RSS (MiB) of the largest process it ran.
measure() {
  local name=$1
  shift
  local start end
  start=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$name.rss" "$@" >"$name.log" 2>&1 || { cat "$name.log" >&2; exit 1; }
  end=$(date +%s.%N)
  echo "$end - $start" | bc >"$name.wall"
}
# io_limit METHOD INPUT...: the I/O floor of a merge: every input read once (from the page
# cache, as the tools read them here) and the output's bytes written once with fsync.
io_limit() {
  local method=$1
  shift
  local bytes start end
  bytes=$(cat out-mergekit-"$method"/*.safetensors | wc -c)
  start=$(date +%s.%N)
  cat "$@" >/dev/null
  dd if=/dev/zero of="io-$method.bin" bs=1M count=$(((bytes + 1048575) / 1048576)) conv=fsync status=none
  end=$(date +%s.%N)
  rm -f "io-$method.bin"
  echo "$end - $start" | bc >"io-$method.wall"
}
declare -A inputs=([ties]="base ft0 ft1 ft2" [linear]="ft0 ft1 ft2" [slerp]="base ft0")
rows=()
for method in ties linear slerp; do
  measure "mergekit-$method" env HF_HUB_OFFLINE=1 "$mergekit" "$method.yml" "out-mergekit-$method" --no-write-model-card --no-copy-tokenizer --allow-crimes
  files=()
  for model in ${inputs[$method]}; do files+=("$model/model.safetensors"); done
  io_limit "$method" "${files[@]}"
  for ranks in 1 2; do
    # One rank as a user runs it, without a launcher; two through mpirun. /usr/bin/time on
    # mpirun sees mpirun itself: each rank reports its own peak instead.
    launcher=()
    [ "$ranks" -gt 1 ] && launcher=(mpirun "${flags[@]}" -np "$ranks")
    measure "gradfix-$method-p$ranks" "${launcher[@]}" "$gradfix" merge --config "$method.yml" --out "out-gradfix-$method-p$ranks" --report-memory --quiet
    # TIES: entries tied in magnitude at a threshold (frequent: an F32 difference of nearby values
    # takes few distinct values) are chosen differently by the two tools (docs/merging.md); the
    # count is recorded, and must stay below 1%.
    python3 "$root/tests/support/close_tensors.py" "out-gradfix-$method-p$ranks" "out-mergekit-$method" --reference-names \
      --max-mismatch 0.01 >"agree-$method-p$ranks.txt"
  done
  rows+=("$method")
done

python3 - "$json" "$parameters" "${rows[@]}" <<'PY'
import json, re, sys
out, parameters, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def wall(name): return float(open(name + ".wall").read())
def rss_mergekit(name): return int(open(name + ".rss").read().split()[-1]) / 1024
def rss_gradfix(name):
    line = re.search(r"peak resident memory per rank \(MiB\):([0-9 ]+)", open(name + ".log").read())
    peaks = [float(x) for x in line.group(1).split()] if line else []
    return max(peaks) if peaks else float("nan")
rows = []
print("# gradfix merge --config against mergekit-yaml, %d parameters (F32), 3 fine-tunes" % parameters)
print("#   io-limit: every input read once from the page cache and the output written once with fsync")
print("#%9s %8s %6s %10s %9s %10s %10s %10s" % ("method", "tool", "ranks", "time(s)", "peak(MiB)", "time/mk", "peak/mk", "time/io"))
for method in methods:
    mk_t, mk_m, io_t = wall("mergekit-" + method), rss_mergekit("mergekit-" + method), wall("io-" + method)
    print(" %9s %8s %6s %10.2f %9s %10.2f %10s %10s" % (method, "io-limit", "", io_t, "", io_t / mk_t, "", "1.00"))
    rows.append({"method": method, "tool": "io-limit", "seconds": io_t})
    print(" %9s %8s %6s %10.2f %9.0f %10s %10s %10.2f" % (method, "mergekit", 1, mk_t, mk_m, "1.00", "1.00", mk_t / io_t))
    rows.append({"method": method, "tool": "mergekit", "ranks": 1, "seconds": mk_t, "peak_mib": mk_m, "io_ratio": mk_t / io_t})
    for ranks in (1, 2):
        name = "gradfix-%s-p%d" % (method, ranks)
        t, m = wall(name), rss_gradfix(name)
        print(" %9s %8s %6d %10.2f %9.0f %10.2f %10.3f %10.2f" % (method, "gradfix", ranks, t, m, t / mk_t, m / mk_m, t / io_t))
        agreement = open("agree-%s-p%d.txt" % (method, ranks)).read().strip()
        rows.append({"method": method, "tool": "gradfix", "ranks": ranks, "seconds": t, "peak_mib": m,
                     "time_ratio": t / mk_t, "peak_ratio": m / mk_m, "io_ratio": t / io_t, "agreement_with_mergekit": agreement})
        print("#   against mergekit: " + agreement)
json.dump({"parameters": parameters, "rows": rows}, open(out, "w"), indent=2)
print("# JSON copy: " + out)
PY
