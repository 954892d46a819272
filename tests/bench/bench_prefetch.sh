#!/usr/bin/env bash
# Gathers one stage ahead (--prefetch on, the default) against every gather waiting for its stage
# (--prefetch off), same run: `signs` on a generated Llama-type directory (hidden 1024, 8 layers,
# intermediate 2816, vocabulary 32,000, untied: 0.67 GB fp32) at P = 2 (16 samples of 64 tokens:
# two groups, both ranks compute) and P = 4 (8 samples: one group, ranks 1-3 wait), ranks of one
# thread. Per run: the wall time, the largest wait on gathers (seconds and share of the wall time,
# from --report-time), the gathers that ran ahead, and the largest rank's peak RSS. The votes of
# both settings must be the same bytes, or the run stops. Prints a table and writes a JSON copy.
#   tests/bench/bench_prefetch.sh [GRADFIX_BINARY] [JSON]
set -euo pipefail
if [[ "${1:-}" == -* ]] || [ $# -gt 2 ]; then
  echo "usage: tests/bench/bench_prefetch.sh [GRADFIX_BINARY] [JSON]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
gradfix=$(realpath "${1:-$root/build/gradfix}")
json=$(realpath -m "${2:-bench_prefetch.json}")
flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
work=$(mktemp -d "${GRADFIX_BENCH_DIR:-/tmp}/gradfix-bench-prefetch-XXXXXX")
trap '[ -n "${GRADFIX_BENCH_KEEP:-}" ] || rm -rf "$work"' EXIT
cd "$work"

hidden=1024 layers=8 inter=2816 vocab=32000
mkdir p2 p4
(cd p2 && python3 "$root/tests/bench/vote_pass.py" write "$hidden" "$layers" "$inter" "$vocab" 16 16 16 64)
(cd p4 && python3 "$root/tests/bench/vote_pass.py" write "$hidden" "$layers" "$inter" "$vocab" 16 16 8 64)
"$gradfix" generate --shapes "$(cat p2/shapes.txt)" --noise 0.02 --seed 1 --out model >/dev/null
cp p2/config.json model/

run() {  # run RANKS DATA PREFETCH: a JSON row
  local ranks=$1 data=$2 prefetch=$3
  GRADFIX_THREADS=1 mpirun "${flags[@]}" -np "$ranks" "$gradfix" signs --weights model --data "$data/tokens.safetensors" \
    --out "votes_${ranks}_$prefetch.safetensors" --prefetch "$prefetch" --report-time --report-memory --quiet >run.log 2>&1 ||
    { cat run.log >&2; exit 1; }
  python3 - "$ranks" "$prefetch" <<'PY'
import json, re, sys
log = open("run.log").read()
peaks = [int(x) for x in re.search(r"peak resident memory per rank \(MiB\): ([0-9 ]+)", log).group(1).split()]
ranks = [tuple(float(v) for v in m) for m in
         re.findall(r"rank \d+: ([0-9.]+) wall, ([0-9.]+) gathers \([0-9.]+%\), [0-9.]+ reductions \([0-9.]+%\); ([0-9.]+) ahead \(([0-9]+) gathers\)", log)]
wall = max(r[0] for r in ranks)
wait = max(r[1] for r in ranks)
print(json.dumps({"ranks": int(sys.argv[1]), "prefetch": sys.argv[2], "wall_seconds": wall, "largest_gather_wait_seconds": wait,
                  "largest_gather_wait_fraction": wait / wall, "gathers_ahead": int(max(r[3] for r in ranks)),
                  "seconds_ahead": max(r[2] for r in ranks), "peak_rss_mib": max(peaks)}))
PY
}

rows=()
for case in "2 p2" "4 p4"; do
  read -r ranks data <<<"$case"
  for prefetch in off on; do rows+=("$(run "$ranks" "$data" "$prefetch")"); done
  cmp -s "votes_${ranks}_off.safetensors" "votes_${ranks}_on.safetensors" ||
    { echo "error: votes at $ranks ranks differ with --prefetch on: the measurement means nothing" >&2; exit 1; }
done

python3 - "$json" "$(nproc)" "${rows[@]}" <<'PY'
import json, sys
out, cores, rows = sys.argv[1], int(sys.argv[2]), [json.loads(r) for r in sys.argv[3:]]
print("# gradfix bench_prefetch: signs, llama 0.67 GB (hidden 1024, 8 layers, vocabulary 32,000), 64 tokens per sample; %d cores; "
      "one thread per rank; --prefetch off is the baseline" % cores)
print("# %5s %8s %9s %9s %19s %8s %14s %9s" % ("ranks", "samples", "prefetch", "wall(s)", "largest gather wait", "ahead", "peak RSS(MiB)", "wall/off"))
base = {}
for row in rows:
    key = row["ranks"]
    if row["prefetch"] == "off":
        base[key] = row
    row["wall_vs_off"] = row["wall_seconds"] / base[key]["wall_seconds"]
    row["peak_vs_off_mib"] = row["peak_rss_mib"] - base[key]["peak_rss_mib"]
    print("  %5d %8d %9s %9.2f %10.2f s %5.1f%% %8d %14d %9.2f" % (row["ranks"], 16 if key == 2 else 8, row["prefetch"], row["wall_seconds"],
          row["largest_gather_wait_seconds"], 100 * row["largest_gather_wait_fraction"], row["gathers_ahead"], row["peak_rss_mib"],
          row["wall_vs_off"]))
print("# votes: the same bytes with --prefetch on and off at every P")
json.dump({"benchmark": "bench_prefetch", "cores": cores, "rows": rows}, open(out, "w"), indent=2)
print("# JSON copy: %s" % out)
PY
