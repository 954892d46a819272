#!/usr/bin/env bash
# The language-model regime probe (issue 27), through gradfix's own commands only: two releases
# of a tiny Llama (hidden 64, 2 layers, vocabulary 64) initialised independently and pretrained
# with `gradfix train` on different mixes and orders of a synthetic language (lm_tasks.py); A and
# B fine-tuned on three downstream tasks (reverse four letters, the parity of the last of four
# digits, a digit sum mod 10); then `gradfix transport` of each tau_A to B at N = 8, 16, 32 shots, three
# seeds, P = 2. Prints one table (token accuracy on the answers, %, mean over seeds) and writes
# the transports' results under the work directory.
#   tests/bench/lm_regime.sh [GRADFIX] [WORKDIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=$(realpath "${1:-$root/build/gradfix}")
work=$(realpath -m "${2:-/tmp/gradfix-lm-regime}")
flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
mkdir -p "$work"
cd "$work"
tasks=(reverse parity add)
steps=${GRADFIX_LM_PRETRAIN_EPOCHS:-4}
# The fine-tunes' learning rate (small: lazy fine-tunes, as the vision demo's) and the alpha grid.
ft_lr=${GRADFIX_LM_FINETUNE_LR:-3e-3}
alphas=${GRADFIX_LM_ALPHAS:-0.05,0.1,0.25,0.5,1,1.5,2,3}
sign_mode=${GRADFIX_LM_SIGN_MODE:-max}
mask_mode=${GRADFIX_LM_MASK_MODE:-normal}

cat >config.json <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 64,
 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "head_dim": 16, "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "tie_word_embeddings": false, "hidden_act": "silu", "initializer_range": 0.05, "torch_dtype": "float32"}
JSON
start=$(date +%s)
# The releases: independent initialisations, different corpora (mix and order).
for release in A:1:0.5 B:2:0.4; do
  IFS=: read -r name seed mix <<<"$release"
  [ -d "${name}_base" ] && continue
  python3 "$root/tests/bench/lm_tasks.py" corpus "corpus_$name.safetensors" 4096 "$seed" "$mix"
  "$gradfix" init --arch llama --config-file config.json --seed "$seed" --out "${name}_init" >/dev/null
  mpirun "${flags[@]}" -np 2 "$gradfix" train --weights "${name}_init" --data "corpus_$name.safetensors" --epochs "$steps" --batch 64 \
    --lr 3e-3 --seed "$seed" --out "${name}_base" | grep '^train:'
done
echo "# releases pretrained in $(($(date +%s) - start)) s"
for task in "${tasks[@]}"; do
  python3 "$root/tests/bench/lm_tasks.py" task "$task" "ft_$task.safetensors" 1024 11
  python3 "$root/tests/bench/lm_tasks.py" task "$task" "pool_$task.safetensors" 512 12
  python3 "$root/tests/bench/lm_tasks.py" task "$task" "test_$task.safetensors" 512 13
  for name in A B; do
    [ -d "${name}_ft_$task" ] && continue
    mpirun "${flags[@]}" -np 2 "$gradfix" train --weights "${name}_base" --data "ft_$task.safetensors" --epochs 4 --batch 32 --lr "$ft_lr" \
      --seed 7 --out "${name}_ft_$task" | grep '^train:'
  done
  [ -f "tau_$task.safetensors" ] || "$gradfix" taskvector --base A_base --finetuned "A_ft_$task" --out "tau_$task.safetensors" >/dev/null
done
echo "# fine-tunes done at $(($(date +%s) - start)) s"
for task in "${tasks[@]}"; do
  for n in 8 16 32; do
    for seed in 0 1 2; do
      out="result_${task}_n${n}_s${seed}.json"
      [ -f "$out" ] && continue
      mpirun "${flags[@]}" -np 2 "$gradfix" transport --target B_base --task-vector "tau_$task.safetensors" \
        --target-finetuned "B_ft_$task" --data "pool_$task.safetensors" --test-data "test_$task.safetensors" --num-samples "$n" \
        --seed "$seed" --support-size 64 --alphas "$alphas" --sign-mode "$sign_mode" --mask-mode "$mask_mode" --finetune-lrs 1e-3,3e-3 --finetune-steps 5,20 \
        --results "$out" --quiet >/dev/null
    done
  done
done
echo "# transports done at $(($(date +%s) - start)) s"
python3 - "${tasks[@]}" <<'PY'
import json, sys, statistics
tasks = sys.argv[1:]
methods = None
table = {}
for task in tasks:
    for n in (8, 16, 32):
        for seed in (0, 1, 2):
            rows = json.load(open("result_%s_n%d_s%d.json" % (task, n, seed)))["rows"]
            methods = methods or [r["method"] for r in rows]
            for r in rows:
                table.setdefault((r["method"], task, n), []).append(100 * r["test_accuracy"])
print("# answer-token accuracy %, mean over 3 seeds (P = 2)")
print("%-40s" % "method" + "".join("%10s" % ("%s/%d" % (t[:3], n)) for t in tasks for n in (8, 16, 32)) + "%10s" % "avg N=16")
for m in methods:
    cells = [statistics.mean(table[(m, t, n)]) for t in tasks for n in (8, 16, 32)]
    middle = statistics.mean(statistics.mean(table[(m, t, 16)]) for t in tasks)
    print("%-40s" % m + "".join("%10.1f" % c for c in cells) + "%10.1f" % middle)
PY
