#!/usr/bin/env bash
# launch/quickstart on the built tree (issue 28 item 9): it exits 0, shows one transport's table
# with B zero-shot, naive, GradFix, the oracle mask and few-shot fine-tuning, where GradFix beats
# the naive transport, and takes the tiny decoder through signs (2 ranks) -> mask -> apply -> eval.
# (Its time is reported in the output; the target, 2.5 minutes on two cores, is checked by hand,
# never here.)
#   quickstart_test.sh BUILD_DIR
set -euo pipefail
build=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
work=$(mktemp -d /tmp/gradfix-quickstart-XXXXXX)
trap 'rm -rf "$work"' EXIT
GRADFIX_QUICKSTART_BUILT=1 GRADFIX_BUILD_DIR=$build GRADFIX_QUICKSTART_DIR=$work "$repo/launch/quickstart" >"$work/out.txt" 2>&1
for row in "B zero-shot" "B + alpha tau_A (naive)" "GradFix (max, normal)" "oracle mask sign(tau_B)" "few-shot fine-tuning of B"; do
  check "the table has the row '$row'" grep -qF -- "$row  " "$work/out.txt"
done
check "GradFix beats the naive transport" python3 - "$work/out.txt" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    for name in ("B + alpha tau_A (naive)", "GradFix (max, normal)"):
        if line.startswith(name) and name not in rows:
            rows[name] = float(line.split()[-1])
assert rows["GradFix (max, normal)"] > rows["B + alpha tau_A (naive)"] + 5, rows
PY
check "signs ran with the decoder's parameters sharded over 2 ranks" grep -q "signs max: llama, 16 samples, .*sharded over 2 rank(s)" "$work/out.txt"
check "the transported decoder is evaluated" test "$(grep -c '^eval: llama, 16 samples' "$work/out.txt")" -eq 2
check "it ends saying where the full study is" grep -q "gradfix demo' runs the full study" "$work/out.txt"
grep "quickstart: done" "$work/out.txt"
finish
