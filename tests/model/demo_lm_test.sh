#!/usr/bin/env bash
# gradfix demo --lm --quick at P = 2: releases pretrained and fine-tuned here, every transport row
# on three tasks; its JSON checked for what must hold on any run (each task learned by B's own
# fine-tune, every row present, the compute counts of the recipe, the mask ablation's normal row
# equal to the main table's GradFix through the statistics cache); then rerun at P = 1 from the
# cached models with the votes recomputed: the same rows. Options of the other demo are refused.
#   demo_lm_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
work=$(mktemp -d /tmp/gradfix-demo-lm-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

start=$SECONDS
mpirun "${mpirun_flags[@]}" -np 2 "$gradfix" demo --lm --quick --cache cache --results two.json >two.log
echo "demo --lm --quick at P = 2: $((SECONDS - start)) s"
check "demo --lm: the tables and the verdict are printed" grep -q "^At N = 16, averaged over the tasks: naive" two.log
check "demo --lm: the releases were pretrained by gradfix train" grep -q "^demo --lm: B_base: train: llama, 2048 samples" two.log
check "demo --lm: the results JSON" python3 - two.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["demo"] == "lm" and r["ranks"] == 2 and r["samples"] == [16] and r["seeds"] == [0], r
tasks = r["tasks"]
assert tasks == ["reverse", "parity", "add"], tasks
methods = ["B zero-shot", "B + alpha tau_A (naive)", "GradFix (max, normal)", "oracle mask sign(tau_B)", "few-shot fine-tuning of B",
           "GradFix + few-shot fine-tuning", "B fine-tuned (upper bound)"]
cell = {(row["method"], row["task"]): row for row in r["rows"]}
assert len(cell) == len(r["rows"]) == len(methods) * len(tasks), sorted(cell)
for (method, task), row in cell.items():
    assert method in methods, method
    assert row["samples"] == 16 and row["support_size"] == 64 and row["seeds"] == [0], row
    assert 0.0 <= row["test_accuracy_mean"] <= 1.0, row
for task in tasks:
    zero, tuned = cell[("B zero-shot", task)], cell[("B fine-tuned (upper bound)", task)]
    # B's own fine-tune learned the task: the upper bound is far above B before it.
    assert tuned["test_accuracy_mean"] > zero["test_accuracy_mean"] + 0.2, (task, zero["test_accuracy_mean"], tuned["test_accuracy_mean"])
    # The compute of the quick recipe: 4 alphas x (64 support + 16 shots) forward; the votes one
    # backward pass of the 16 shots; fine-tuning 5 full-batch steps and one support score.
    naive, ours = cell[("B + alpha tau_A (naive)", task)], cell[("GradFix (max, normal)", task)]
    finetuned, both = cell[("few-shot fine-tuning of B", task)], cell[("GradFix + few-shot fine-tuning", task)]
    assert (zero["forward_samples_mean"], zero["backward_samples_mean"]) == (0, 0), zero
    assert (naive["forward_samples_mean"], naive["backward_samples_mean"]) == (320, 0), naive
    assert (ours["forward_samples_mean"], ours["backward_samples_mean"]) == (336, 16), ours
    assert (finetuned["forward_samples_mean"], finetuned["backward_samples_mean"]) == (5 * 16 + 64, 5 * 16), finetuned
    assert both["forward_samples_mean"] == ours["forward_samples_mean"] + finetuned["forward_samples_mean"], both
    assert both["backward_samples_mean"] == ours["backward_samples_mean"] + finetuned["backward_samples_mean"], both
    assert len(ours["alpha_curve_mean"]) == 4 and ours["alpha_mean"] in (0.1, 0.5, 1, 2), ours
    assert 0.0 < ours["kept_mean"] < 1.0 and 0.0 < ours["sign_agreement_mean"] < 1.0, ours
    assert cell[("oracle mask sign(tau_B)", task)]["sign_agreement_mean"] == 1.0
modes = {(m["mask_mode"], m["task"]): m["gradfix_test_accuracy_mean"] for m in r["mask_modes"]}
assert sorted({m for m, _ in modes}) == ["force", "normal", "random"], modes
for task in tasks:
    assert modes[("normal", task)] == cell[("GradFix (max, normal)", task)]["test_accuracy_mean"], task
c = r["criteria"]
assert c["samples"] == 16 and c["zero_shot"] == sum(cell[("B zero-shot", t)]["test_accuracy_mean"] for t in tasks) / 3, c
assert c["oracle_above_gradfix"] == (c["oracle"] > c["gradfix"]), c
assert len(r["finetune_comparison"]) == 3, r["finetune_comparison"]
PY
check "demo --lm: the few-shot statistics are kept in the cache" test "$(find cache/statistics -name '*.safetensors' | wc -l)" -gt 0

"$repo/launch/plot" two.json --out plots >plot.log
check "launch/plot draws the LM demo against N" grep -q ">labelled samples N<" plots/accuracy_vs_shots.svg
check "launch/plot draws the LM demo's mask modes at N = 16" grep -q "GradFix with each mask mode at N = 16" plots/mask_modes.svg

# From the cache at one rank, votes recomputed: the same rows.
rm -rf cache/statistics
"$gradfix" demo --lm --quick --cache cache --results one.json >one.log
check "demo --lm: the second run reuses the releases and fine-tunes" test "$(grep -c '^demo --lm: using cached' one.log)" -eq 8
check "demo --lm: the same rows at P = 1 as at P = 2" python3 - two.json one.json <<'PY'
import json, sys
two, one = (json.load(open(path)) for path in sys.argv[1:])
for key in ("rows", "mask_modes", "criteria", "finetune_comparison"):
    assert two[key] == one[key], key
PY

expect_exit2 "demo --lm refuses the vision demo's options" "demo --lm: --transform applies to the vision demo" \
  "$gradfix" demo --lm --quick --transform rotate:20
expect_exit2 "the vision demo refuses --samples" "demo: --samples applies to the language-model demo" "$gradfix" demo --quick --samples 8
expect_exit2 "demo --lm names an unknown task" "--lm-tasks: unknown task 'sort'" "$gradfix" demo --lm --lm-tasks reverse,sort
expect_exit2 "demo --lm bounds N by the pool" "--samples: every N must be from 1 to 448" "$gradfix" demo --lm --samples 8,449
finish
