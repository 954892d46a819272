#!/usr/bin/env bash
# gradfix sweep on configs/paper-table1.ini as shipped, run in a directory laid out as the config
# expects but holding the tiny random CLIP of tests/fixtures/clip (B), a noisy copy as release A,
# noisy fine-tunes, the fixture's head and synthetic images (float32 for some tasks, 8-bit of
# another size for others): no claim about accuracy, only that the protocol runs end to end.
# Checks: every point written; a point's result equals `gradfix transport` with the same options;
# the table has the paper's rows for the five tasks and the average; a sweep killed mid-run and
# started again at another rank count repeats no finished point and ends with the same table; a
# changed option reruns; --point, --list, --count, --collect; bad sweep files refused with exit 2.
#   sweep_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/clip
config=$repo/configs/paper-table1.ini
work=$(mktemp -d /tmp/gradfix-sweep-XXXXXX)
# (kill 0 would signal this script's whole process group, ctest included: only a started sweep.)
trap '[ -z "${sweep_pid:-}" ] || kill "$sweep_pid" 2>/dev/null || true; [ "${failed:-0}" -eq 0 ] && rm -rf "$work" || echo "kept $work" >&2' EXIT
cd "$work"

mkdir -p models heads data
cp -r "$fixtures/model" models/clip-vit-b16-laion2b
"$gradfix" generate --like models/clip-vit-b16-laion2b --like-scale 1 --noise 0.05 --seed 1 --out models/clip-vit-b16-datacomp >/dev/null
seed=10
for task in eurosat svhn gtsrb resisc45 dtd; do
  "$gradfix" generate --like models/clip-vit-b16-datacomp --like-scale 1 --noise 0.02 --seed $((seed++)) \
    --out "models/clip-vit-b16-datacomp-$task" >/dev/null
  "$gradfix" generate --like models/clip-vit-b16-laion2b --like-scale 1 --noise 0.02 --seed $((seed++)) \
    --out "models/clip-vit-b16-laion2b-$task" >/dev/null
  cp "$fixtures/head.safetensors" "heads/$task-laion2b.safetensors"
done
# Images: float32 [N, 3, 16, 16] for three tasks, 8-bit [N, 24, 20, 3] (resized by gradfix) for two.
python3 - <<'PY'
import json, random, struct
def write(path, n, seed, byte_images):
    rng = random.Random(seed)
    if byte_images:
        shape, dtype, fmt = [n, 24, 20, 3], "U8", "B"
        values = [rng.randrange(256) for _ in range(n * 24 * 20 * 3)]
    else:
        shape, dtype, fmt = [n, 3, 16, 16], "F32", "f"
        values = [rng.gauss(0, 1) for _ in range(n * 3 * 16 * 16)]
    body = struct.pack("<%d%s" % (len(values), fmt), *values)
    header = {"inputs": {"dtype": dtype, "shape": shape, "data_offsets": [0, len(body)]},
              "labels": {"dtype": "I64", "shape": [n], "data_offsets": [len(body), len(body) + 8 * n]}}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + body + struct.pack("<%dq" % n, *[i % 5 for i in range(n)]))
for k, task in enumerate(["eurosat", "svhn", "gtsrb", "resisc45", "dtd"]):
    write("data/%s-train.safetensors" % task, 25, 2 * k, task in ("svhn", "dtd"))
    write("data/%s-test.safetensors" % task, 10, 2 * k + 1, task in ("svhn", "dtd"))
PY
for file in data/*.safetensors; do "$gradfix" convert "$file" "${file%.safetensors}.h5" >/dev/null; done

# Small enough for a test: 5 tasks x 2 seeds = 10 points, each about half a second (most of it
# the few-shot fine-tuning), so that the sweep below can be killed in the middle of one.
small=(--set sweep.seed=0,1 --set transport.support-size=10 --set transport.alphas=0.5,1
       --set transport.finetune-lrs=1e-4,1e-3 --set transport.finetune-steps=1,25)
check "the sweep counts 10 points" test "$("$gradfix" sweep --config "$config" "${small[@]}" --count)" = 10
"$gradfix" sweep --config "$config" "${small[@]}" >sweep.log
check "every point has a result" test "$(find out/paper-table1/points -name '*.json' | wc -l)" -eq 10
check "the sweep reports 10 points run" grep -q "sweep: 10 point(s) run, 0 already finished" sweep.log
cp out/paper-table1/table.md table-once.md
cp out/paper-table1/results.csv results-once.csv
check "the table has the paper's rows, five tasks and the average" python3 - <<'PY'
lines = open("table-once.md").read().splitlines()
header = [l for l in lines if l.startswith("| method")][0]
assert header == "| method | eurosat | svhn | gtsrb | resisc45 | dtd | average |", header
rows = [l.split("|")[1].strip() for l in lines if l.startswith("| ") and not l.startswith("| method")]
assert rows == ["zero-shot", "naive (B + alpha tau_A)", "few-shot fine-tuning", "GradFix (max, normal)", "GradFix + few-shot fine-tuning",
                "oracle (sign(tau_B) mask)", "fine-tuned B"], rows
for l in lines:
    if l.startswith("| zero-shot"):
        cells = [c.strip() for c in l.split("|")[2:-1]]
        assert all("+-" in c for c in cells[:5]) and cells[5] != "-", cells
PY
check "results.csv: a header and 7 rows per point" test "$(wc -l <results-once.csv)" -eq 71
check "results.csv: each row's compute; fine-tuning from GradFix costs GradFix's and fine-tuning's" python3 - <<'PY'
import csv, collections
rows = list(csv.DictReader(open("results-once.csv")))
by_point = collections.defaultdict(dict)
for row in rows:
    by_point[(row["task"], row.get("seed", ""))][row["method"]] = row
for methods in by_point.values():
    cost = lambda m: (int(methods[m]["forward_samples"]), int(methods[m]["backward_samples"]))
    gradfix, tuned, both = cost("GradFix (max, normal)"), cost("few-shot fine-tuning of B"), cost("GradFix + few-shot fine-tuning")
    assert both == (gradfix[0] + tuned[0], gradfix[1] + tuned[1]) and tuned[1] > 0 and gradfix[1] > 0, (gradfix, tuned, both)
    assert methods["B fine-tuned (upper bound)"]["forward_samples"] == "", methods["B fine-tuned (upper bound)"]
PY

# Plots of the finished sweep (launch/plot): each as PNG and SVG, the methods in the legends.
"$repo/launch/plot" out/paper-table1 --out plots >plot.log
for name in accuracy_vs_shots accuracy_vs_compute accuracy_by_task sign_agreement accuracy_vs_alpha alpha_curves; do
  check "launch/plot: $name.png is a PNG" bash -c "head -c 4 plots/$name.png | od -An -tx1 | grep -q '89 50 4e 47'"
  check "launch/plot: $name.svg is an SVG" grep -q "<svg" "plots/$name.svg"
done
check "launch/plot: every method in the accuracy plot" bash -c "grep -q 'GradFix (max, normal)' plots/accuracy_vs_shots.svg &&
  grep -q 'few-shot fine-tuning of B' plots/accuracy_vs_shots.svg && grep -q 'oracle mask sign(tau_B)' plots/accuracy_vs_shots.svg"
check "launch/plot: fine-tuning from GradFix against compute" grep -q 'GradFix + few-shot fine-tuning' plots/accuracy_vs_compute.svg
check "launch/plot: the alpha curves of the searched rows only" bash -c "grep -q 'B + alpha tau_A (naive)' plots/alpha_curves.svg &&
  ! grep -q 'B zero-shot' plots/alpha_curves.svg"
check "launch/plot: nothing skipped" bash -c "! grep -q skipped plot.log"
expect_exit2 "launch/plot of a directory without results.csv" "no results.csv (run .gradfix sweep" "$repo/launch/plot" nowhere

# A point's result is what gradfix transport writes with the same options.
"$gradfix" transport --target models/clip-vit-b16-laion2b --source-base models/clip-vit-b16-datacomp \
  --source-finetuned models/clip-vit-b16-datacomp-svhn --target-finetuned models/clip-vit-b16-laion2b-svhn \
  --head heads/svhn-laion2b.safetensors --data data/svhn-train.h5 --test-data data/svhn-test.h5 --shots-per-class 2 \
  --sign-mode max --mask-mode normal --seed 1 --support-size 10 --alphas 0.5,1 --finetune-lrs 1e-4,1e-3 --finetune-steps 1,25 \
  --results direct.json >/dev/null
point=$(ls out/paper-table1/points/svhn/*seed=1-*.json)
# The point also says what the sweep's statistics cache did; the rest is the same.
check "the svhn seed-1 point equals a direct transport" python3 -c "
import json, sys
point, direct = json.load(open('$point')), json.load(open('direct.json'))
cache = point.pop('statistics_cache')
sys.exit(0 if point == direct and cache['directory'] == 'out/paper-table1/statistics' else 1)"

# Killed mid-run, then resumed at another rank count: finished points are kept as they are.
rm -rf out
# Its own session, so that one SIGKILL reaches mpirun and every rank at once (as scancel would).
setsid mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" sweep --config "$config" "${small[@]}" >killed.log 2>&1 &
sweep_pid=$!
for _ in $(seq 3000); do
  [ "$(find out/paper-table1/points -name '*.json' 2>/dev/null | wc -l)" -ge 3 ] && break
  sleep 0.02
done
kill -KILL -- "-$sweep_pid" 2>/dev/null || true
disown "$sweep_pid" 2>/dev/null || true
pkill -KILL -f "sweep --config $config" 2>/dev/null || true
wait "$sweep_pid" 2>/dev/null || true
for _ in $(seq 100); do
  pgrep -f "sweep --config $config" >/dev/null || break
  sleep 0.1
done
find out/paper-table1/points -name '*.json' -printf '%p %i %T@\n' | sort >before.txt
finished=$(wc -l <before.txt)
check "the killed sweep had finished some points but not all ($finished)" test "$finished" -ge 3 -a "$finished" -lt 10
"$gradfix" sweep --config "$config" "${small[@]}" >resumed.log
check "the resumed sweep skips the $finished finished points" grep -q "sweep: $((10 - finished)) point(s) run, $finished already finished" resumed.log
find out/paper-table1/points -name '*.json' -printf '%p %i %T@\n' | sort >after.txt
check "finished points were not rewritten" bash -c "join before.txt after.txt | awk '\$2 != \$4 || \$3 != \$5 { bad = 1 } END { exit bad }'"
check "the resumed sweep ends with the same table as the uninterrupted one" cmp -s table-once.md out/paper-table1/table.md
check "and the same results.csv" cmp -s results-once.csv out/paper-table1/results.csv
check "no temporary file is left among the points" test -z "$(find out/paper-table1/points -name '.*')"
"$gradfix" sweep --config "$config" "${small[@]}" >again.log
check "a finished sweep runs nothing" grep -q "sweep: 0 point(s) run, 10 already finished" again.log

# A changed option is a new point; --point runs one; --list says what is done; --collect gathers.
"$gradfix" sweep --config "$config" "${small[@]}" --set transport.alphas=1 --point 3 >point.log
check "--point 3 with another alpha grid runs that point only" grep -q "sweep: 1 point(s) run, 0 already finished" point.log
"$gradfix" sweep --config "$config" "${small[@]}" --set transport.alphas=1 --list >list.txt
check "--list: point 3 done, the other 9 pending" bash -c "[ \$(grep -c pending list.txt) -eq 9 ] && grep -q '^3	done	svhn/' list.txt"
"$gradfix" sweep --config "$config" "${small[@]}" --set transport.alphas=1 --collect >collect.log
check "--collect over a partial sweep names the missing points" grep -q "1 of 10 points finished" out/paper-table1/table.md

# Bad sweep files and flags: exit 2, the file, section and key named.
expect_bad() {  # expect_bad DESCRIPTION PATTERN ARGS...
  local description=$1 pattern=$2
  shift 2
  expect_exit2 "$description" "$pattern" "$gradfix" sweep "$@"
}
printf '[sweep]\nout = o\n[transport]\ntarget = t\nalpha = 1\n[task.a]\ndata = d\n' >typo.ini
expect_bad "a key that is not a transport option" "typo.ini: \[transport\] 'alpha' is not an option of 'gradfix transport'" --config typo.ini
printf '[sweep]\nout = o\nseed = 0,1\n[task.a]\nseed = 3\n' >axis.ini
expect_bad "a task setting an axis" "axis.ini: \[task.a\] sets seed, which is an axis of \[sweep\]" --config axis.ini
printf '[sweep]\nout = o\nalphas = 1,2\n[task.a]\ndata = d\n' >list.ini
expect_bad "alphas as an axis" "\[sweep\] alphas is a list itself, not an axis" --config list.ini
printf '[sweep]\nseed = 0\n[task.a]\ndata = d\n' >noout.ini
expect_bad "no out" "noout.ini: \[sweep\] needs out = DIRECTORY" --config noout.ini
printf '[sweep]\nout = o\n[task.a]\nresults = r.json\n' >results.ini
expect_bad "a task choosing its results file" "a sweep sets where results go itself" --config results.ini
printf '[sweep]\nout = o\nseed = 0,../x\n[task.a]\ndata = d\n' >escape.ini
expect_bad "an axis value with a slash" "value '../x' must be 1-64 letters" --config escape.ini
printf '[sweep]\nout = o\n[task.a/b]\ndata = d\n' >taskname.ini
expect_bad "a task name with a slash" "task name 'a/b' must be 1-64 letters" --config taskname.ini
expect_bad "--point past the last point" "--point 10 but the sweep has 10 points (0 to 9)" --config "$config" "${small[@]}" --point 10
expect_bad "--set without =" "expected SECTION.KEY=VALUE" --config "$config" --set sweep.seed
expect_bad "no config" "--config SWEEP.ini is required" --count
finish
