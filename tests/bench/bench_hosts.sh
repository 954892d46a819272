#!/usr/bin/env bash
# One job on four ranks placed three ways, in the same run: 1 host x 4 ranks as plain mpirun
# (shared memory between ranks), 1 host x 4 ranks inside one network-namespace host, and 2 hosts x
# 2 ranks (namespaces on a bridge, tests/multihost/hosts.sh: TCP between the hosts). The jobs: a
# soft1 mask of a bf16 checkpoint (default 400 MB; file I/O and one statistics reduction per
# tensor) and signs --sign-mode max on a Llama-type decoder gradfix initialises (hidden 512, 4
# layers, vocabulary 8000, 32 samples x 64 tokens: layer gathers and vote reductions). Each time
# is the best of two runs, the whole command as a user sees it. Outputs must be byte-identical
# across placements. Prints a table and writes a JSON copy. Needs root (namespaces).
#   tests/bench/bench_hosts.sh [GRADFIX_BINARY] [SIZE_BYTES] [JSON]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=${1:-$root/build/gradfix}
size=${2:-400000000}
json=${3:-bench_hosts.json}
source "$root/tests/mpi/common.sh"
source "$root/tests/multihost/hosts.sh"
reason=$(can_make_hosts) || { echo "bench_hosts: cannot make hosts here: $reason" >&2; exit 1; }
# Under the hosts' shared directory: each host has its own /tmp.
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-$shared_dir}/gradfix-bench-hosts-XXXXXX")
hosts_cleanup_extra="rm -rf '$work'"
hosts_up 2
cd "$work"

source "$root/tests/bench/bench_common.sh"
shapes=$(block_shapes $((size / 2)))
"$gradfix" generate --shapes "$shapes" --dtype BF16 --noise 0.01 --seed 2 --out tau.safetensors >/dev/null
"$gradfix" generate --like tau.safetensors --like-scale 0 --noise 1 --seed 3 --out signs.safetensors >/dev/null
bytes=$(stat -c %s tau.safetensors)
cat >config.json <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1376,
 "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8000,
 "max_position_embeddings": 256, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false,
 "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
JSON
"$gradfix" init --arch llama --config-file config.json --seed 1 --out decoder >/dev/null
"$root/tests/support/token_data.py" tokens.safetensors 32 64 1 --random 8000
model_bytes=$(du -cb decoder/*.safetensors | tail -1 | cut -f1)

calc() { awk "BEGIN { print $1 }"; }
seconds() { local start end; start=$(date +%s.%N); "$@" >run.log 2>&1; end=$(date +%s.%N); calc "$end - $start"; }
best_of_two() { local a b; a=$(seconds "$@"); b=$(seconds "$@"); calc "($a < $b) ? $a : $b"; }
cat tau.safetensors signs.safetensors decoder/*.safetensors >/dev/null

printf '# gradfix bench_hosts: mask of %s bytes of bf16; signs of a %s-byte decoder, 32 x 64 tokens; %s cores; 4 ranks\n' \
  "$bytes" "$model_bytes" "$(nproc)"
printf '# %6s %-22s %10s %12s\n' job placement "time(s)" "vs 1 host"
rows=""
for job in mask signs; do
  case $job in
    mask) command=(mask --task-vector tau.safetensors --signs signs.safetensors --mask-mode soft1 --out "out_$job.safetensors") ;;
    signs) command=(signs --weights decoder --data tokens.safetensors --sign-mode max --out "out_$job.safetensors") ;;
  esac
  baseline=""
  for placement in plain one_host two_hosts; do
    case $placement in
      plain) launch=(mpirun "${mpirun_flags[@]}" -np 4) label="1 host x 4 (plain)" ;;
      one_host) mpirun_hosts 4; launch=(mpirun "${mpirun_flags[@]}" -np 4 "${mpirun_host_flags[@]}") label="1 host x 4 (namespace)" ;;
      two_hosts) mpirun_hosts 2 2; launch=(mpirun "${mpirun_flags[@]}" -np 4 "${mpirun_host_flags[@]}") label="2 hosts x 2 (TCP)" ;;
    esac
    time=$(best_of_two "${launch[@]}" "$gradfix" "${command[@]}")
    [ -n "$baseline" ] || baseline=$time
    if [ "$placement" = plain ]; then
      mv "out_$job.safetensors" "reference_$job.safetensors"
    elif ! cmp -s "out_$job.safetensors" "reference_$job.safetensors"; then
      echo "error: $job on $label wrote other bytes than on one host: the timing means nothing" >&2
      exit 1
    fi
    ratio=$(calc "$time / $baseline")
    printf '  %6s %-22s %10.2f %12.2f\n' "$job" "$label" "$time" "$ratio"
    rows+="${rows:+,}{\"job\":\"$job\",\"placement\":\"$placement\",\"seconds\":$time,\"ratio_to_plain\":$ratio}"
    rm -f "out_$job.safetensors"
  done
done
cd - >/dev/null
printf '{"benchmark":"bench_hosts","mask_bytes":%s,"decoder_bytes":%s,"cores":%s,"ranks":4,"rows":[%s]}\n' \
  "$bytes" "$model_bytes" "$(nproc)" "$rows" >"$json"
echo "# JSON copy: $json"
