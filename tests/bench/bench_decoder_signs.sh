#!/usr/bin/env bash
# signs on a generated Llama-type decoder (random weights, a Hugging Face directory): peak
# resident memory per rank at P = 1, 2, 4 with the parameters sharded (the P = 4 target is at most
# 0.4x the P = 1 peak), and time per sample of the batched per-sample products against one
# backward pass per sample (--method loop), measured in the same run. Prints a table and writes
# a JSON copy. Every vote file must be byte-identical to the P = 1 fast one, or the run stops.
#   tests/bench/bench_decoder_signs.sh [GRADFIX_BINARY] [JSON] [HIDDEN LAYERS INTERMEDIATE VOCAB] [SAMPLES TOKENS]
set -euo pipefail
if [[ "${1:-}" == -* ]] || [ $# -gt 8 ]; then
  echo "usage: tests/bench/bench_decoder_signs.sh [GRADFIX_BINARY] [JSON] [HIDDEN LAYERS INTERMEDIATE VOCAB] [SAMPLES TOKENS]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=${1:-$root/build/gradfix}
json=${2:-bench_decoder_signs.json}
hidden=${3:-1024} layers=${4:-12} intermediate=${5:-3584} vocab=${6:-32000}
samples=${7:-32} tokens=${8:-128}
flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-/tmp}/gradfix-bench-decoder-XXXXXX")
trap '[ -n "${GRADFIX_BENCH_KEEP:-}" ] || rm -rf "$work"' EXIT
cd "$work"

# The config, the tensor list for `gradfix generate`, and the token data (16 heads, 4 of keys and values).
python3 "$root/tests/bench/vote_pass.py" write "$hidden" "$layers" "$intermediate" "$vocab" 16 4 "$samples" "$tokens"
mpirun "${flags[@]}" -np 2 "$gradfix" generate --shapes "$(cat shapes.txt)" --noise 0.02 --seed 1 --max-shard-size 500MB --out model >/dev/null
cp config.json model/
bytes=$(du -cb model/*.safetensors | tail -1 | cut -f1)

calc() { awk "BEGIN { print $1 }"; }
run() {  # run RANKS METHOD OUT: prints the seconds and the largest rank's peak RSS in MiB
  local start end
  start=$(date +%s.%N)
  mpirun "${flags[@]}" -np "$1" "$gradfix" signs --weights model --data tokens.safetensors --method "$2" --out "$3" --report-memory >run.log 2>&1 ||
    { cat run.log >&2; exit 1; }
  end=$(date +%s.%N)
  echo "$(calc "$end - $start") $(grep "peak resident memory" run.log | tr ' ' '\n' | grep -E '^[0-9]+$' | sort -n | tail -1)"
}
printf '# gradfix bench_decoder_signs: llama %s hidden, %s layers, %s intermediate, %s vocab: %s bytes fp32; %s samples x %s tokens; %s cores\n' \
  "$hidden" "$layers" "$intermediate" "$vocab" "$bytes" "$samples" "$tokens" "$(nproc)"
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
printf '{"benchmark":"bench_decoder_signs","model_bytes":%s,"hidden":%s,"layers":%s,"intermediate":%s,"vocab":%s,"samples":%s,"tokens":%s,"cores":%s,"speedup_fast_vs_loop":%s,"rows":[%s]}\n' \
  "$bytes" "$hidden" "$layers" "$intermediate" "$vocab" "$samples" "$tokens" "$(nproc)" "$(calc "$time / $fast_time")" "$rows" >"$json"
echo "# JSON copy: $json"
