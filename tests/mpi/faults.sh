#!/usr/bin/env bash
# Failures under mpirun: an error seen by one rank only, and a rank killed mid-run. Each must end
# every rank with a non-zero exit code within seconds, print the error once, and publish nothing:
# no output file and no temporary file left in the output directory.
#   faults.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
source "$(dirname "$0")/common.sh"
work=$(mktemp -d /tmp/gradfix-faults-XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
mkdir out

"$gradfix" generate --shapes "w=300x64,v=10000" --seed 1 --out base.safetensors >/dev/null
# A NaN in the last element of the file: only the last rank's shard sees it.
cp base.safetensors nan.safetensors
size=$(stat -c %s nan.safetensors)
printf '\xff\xff\xff\xff' | dd of=nan.safetensors bs=1 seek=$((size - 4)) conv=notrunc 2>/dev/null

set +e
mpirun "${mpirun_flags[@]}" -np 3 "$gradfix" apply --base base.safetensors --task-vector nan.safetensors \
  --out out/applied.safetensors >stdout.txt 2>stderr.txt
code=$?
set -e
check "a rank-local NaN fails the job (exit $code)" test "$code" -ne 0
check "the error names the file, tensor, element and rank" grep -q "\[rank 2/3 on .*nan.safetensors: tensor 'v': element 9999 is NaN" stderr.txt
check "the error is printed once" test "$(grep -c 'gradfix: error' stderr.txt)" -eq 1
check "nothing is published after a rank-local error" test -z "$(ls -A out)"

# Bad input that every rank sees: agreed on, printed once, normal exit code 2 on every rank.
set +e
mpirun "${mpirun_flags[@]}" -np 4 "$gradfix" mask --task-vector base.safetensors --signs missing.h5 \
  --out out/masked.safetensors >stdout.txt 2>stderr.txt
code=$?
set -e
check "a missing input exits with 2 (got $code)" test "$code" -eq 2
check "a missing input is reported once" test "$(grep -c 'gradfix: error' stderr.txt)" -eq 1
check "nothing is published after a missing input" test -z "$(ls -A out)"

# A rank killed mid-run: the others are stopped, their temporary files removed.
"$gradfix" generate --shapes "a=512x512,b=512x512,c=512x512,d=512x512" --seed 2 --out big.safetensors >/dev/null
"$gradfix" generate --like big.safetensors --seed 3 --out big_signs.safetensors >/dev/null
GRADFIX_TEST_PAUSE_MS=200 mpirun "${mpirun_flags[@]}" -np 3 "$gradfix" mask --task-vector big.safetensors \
  --signs big_signs.safetensors --mask-mode soft1 --chunk-elements 16384 --out out/killed.safetensors >stdout.txt 2>stderr.txt &
launcher=$!
for _ in $(seq 100); do  # wait until the output's temporary file exists: the job is writing
  [ -n "$(find out -name '.*.tmp-*' 2>/dev/null)" ] && break
  sleep 0.1
done
check "the job started writing before the kill" test -n "$(find out -name '.*.tmp-*')"
# This job's ranks only (mpirun's children): other gradfix processes on the machine are not ours.
ranks=$(pgrep -P "$launcher" -x gradfix || true)
victim=$(echo "$ranks" | tail -n 1)
check "the job's 3 ranks are found" test "$(echo "$ranks" | grep -c .)" -eq 3
started=$(date +%s)
kill -9 "$victim"
set +e
wait "$launcher"
code=$?
set -e
elapsed=$(($(date +%s) - started))
check "killing a rank fails the job (exit $code)" test "$code" -ne 0
live_ranks() {  # of this job's ranks, those still running (zombies are gone, only not yet reaped)
  local count=0 pid
  for pid in $ranks; do
    ps -p "$pid" -o stat= 2>/dev/null | grep -vq '^Z' && count=$((count + 1))
  done
  echo "$count"
}
check "every rank is gone within 20 s (took ${elapsed} s)" test "$elapsed" -le 20 -a "$(live_ranks)" -eq 0
check "nothing is published after a kill" test -z "$(ls -A out)"
finish
