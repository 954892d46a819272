#!/usr/bin/env bash
# The watchdog (--timeout): one of three ranks is stopped (SIGSTOP) mid-run, so that it neither
# dies nor answers. The other ranks must give up within the timeout plus a few seconds, rank 0
# naming the rank that never arrived, and the job must publish nothing and leave no temporary
# file. The job is a CLIP transport of the tiny fixture with a long few-shot fine-tuning (many
# collectives for a few seconds); the same job, shorter, succeeds with the same timeout.
#   hang_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
fixtures=$repo/tests/fixtures/clip
work=$(mktemp -d /tmp/gradfix-hang-XXXXXX)
trap 'pkill -KILL -f -- "--out $work/" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"

"$gradfix" convert "$fixtures/images.safetensors" images.h5 >/dev/null
"$gradfix" generate --like "$fixtures/model" --like-scale 0 --noise 0.01 --seed 1 --include '^vision_model\.|^visual_projection' \
  --out tau.safetensors >/dev/null
printf '0\n1\n2\n' >shots.txt
job=(transport --target "$fixtures/model" --head "$fixtures/head.safetensors" --task-vector tau.safetensors --data images.h5
     --test-data images.h5 --indices shots.txt --support-size 3 --alphas 0.5 --finetune-lrs 1e-3 --timeout 4)

mpirun "${mpirun_flags[@]}" -np 3 "$gradfix" "${job[@]}" --finetune-steps 1,20 --out "$work/ok" >ok.log 2>&1
check "the job succeeds at 3 ranks with --timeout 4 when no rank stops" test -s ok/config.json

# The pid of world rank 2 of the job writing OUT.
rank_pid() {
  local pid
  for pid in $(pgrep -f -- "--out $work/$1" || true); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=2"; then
      echo "$pid"
      return
    fi
  done
}
GRADFIX_PROGRESS_SECONDS=0 mpirun "${mpirun_flags[@]}" -x GRADFIX_PROGRESS_SECONDS -np 3 "$gradfix" "${job[@]}" --finetune-steps 1,5000 \
  --out "$work/hung" >hung.log 2>&1 &
launcher=$!
# Stop rank 2 once the job is under way: rank 0's progress lines (every update here) start after
# every rank has started MPI and read its inputs. A fixed sleep stopped a rank inside MPI's own
# start-up on a loaded machine, where no watchdog runs yet.
for _ in $(seq 1 600); do
  grep -q "samples" hung.log 2>/dev/null && break
  sleep 0.1
done
sleep 1  # in the fine-tuning's collectives
stopped=$(rank_pid hung)
[ -n "$stopped" ] && kill -STOP "$stopped"
start=$(date +%s.%N)
set +e
wait "$launcher"
code=$?
set -e
elapsed=$(awk "BEGIN { print $(date +%s.%N) - $start }")
[ -n "$stopped" ] && kill -KILL "$stopped" 2>/dev/null || true
check "rank 2 was found and stopped" test -n "$stopped"
check "the job fails (exit $code)" test "$code" -ne 0
check "the other ranks gave up within the timeout plus a few seconds (${elapsed} s after the stop)" awk "BEGIN { exit !($elapsed < 4 + 10) }"
check "rank 0 names the stopped rank, and only it" grep -q "rank(s) 2 on $(hostname) (silent for [0-9]* s, last seen at #[0-9]*) stopped answering" hung.log
check "nothing is published" test ! -e hung
check "no temporary file is left" test -z "$(ls -A | grep '^\.' || true)"
[ "$failed" -eq 0 ] || cat hung.log >&2
finish
