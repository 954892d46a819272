#!/usr/bin/env bash
# The scripts in slurm/ on a real one-node Slurm (Debian's slurm-wlm and munge, installed by
# launch/setup): starts munged, slurmctld and slurmd on localhost with a generated slurm.conf in a
# temporary directory, submits each script with sbatch on a small job, checks the outputs
# against a plain run, and stops the daemons it started (by pid).
#   slurm_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
source "$repo/tests/slurm/slurm_common.sh"
require_slurm

work=$(mktemp -d /tmp/gradfix-slurm-XXXXXX)
chmod 700 "$work"
host=$(hostname -s)
stop_daemons() {
  for name in slurmd slurmctld munged; do
    [ -f "$work/$name.pid" ] && kill "$(cat "$work/$name.pid")" 2>/dev/null || true
  done
  for name in slurmd slurmctld munged; do
    for _ in $(seq 50); do
      [ -f "$work/$name.pid" ] && kill -0 "$(cat "$work/$name.pid")" 2>/dev/null || break
      sleep 0.1
    done
  done
  if [ "${failed:-0}" -ne 0 ]; then tail -n 20 "$work"/*.log >&2 || true; fi
  rm -rf "$work"
}
trap stop_daemons EXIT

start_munge "$work"

mkdir -p "$work/state" "$work/spool" "$work/jobs"
cat >"$work/slurm.conf" <<CONF
ClusterName=gradfixtest
SlurmctldHost=$host
SlurmctldPort=16817
SlurmdPort=16818
$(slurm_conf_common "$work")
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
NodeName=$host CPUs=8 RealMemory=2000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
slurm_gpu_files "$work"
export SLURM_CONF=$work/slurm.conf

slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  [ "$state" = "idle" ] && break
  sleep 0.2
done
check "the node comes up idle (state '${state:-none}')" test "${state:-}" = "idle"

cd "$work/jobs"
mask_job_inputs "$gradfix"

export GRADFIX_BIN=$gradfix
small=(--time=5 --cpus-per-task=1)
check "single-node script runs (2 ranks via srun --mpi=pmix)" \
  sbatch --wait --quiet "${small[@]}" --ntasks-per-node=2 --gpus-per-node=2 --output=single.out \
  "$repo/slurm/gradfix-single-node.sbatch" mask --task-vector tau.safetensors --signs signs.h5 --mask-mode soft1 --out single.safetensors
check "single-node output equals a plain run" cmp -s reference.safetensors single.safetensors
check "single-node log shows 2 ranks" grep -q "2 rank(s)" single.out

check "multi-node script runs (one node here, 3 ranks)" \
  sbatch --wait --quiet "${small[@]}" --nodes=1 --ntasks-per-node=3 --gpus-per-node=4 --output=multi.out \
  "$repo/slurm/gradfix-multi-node.sbatch" mask --task-vector tau.safetensors --signs signs.h5 --mask-mode soft1 --out multi
# A directory output holds the same tensors as the plain run's file (its metadata records the
# directory's own writing, so the tensors are compared, not the files).
check "multi-node output equals a plain run" "$repo/tests/support/same_tensors.py" reference.safetensors multi

cat >sweep.txt <<'SWEEP'
# one line per array task
mask --task-vector tau.safetensors --signs signs.h5 --mask-mode normal --out sweep-{task}.safetensors
mask --task-vector tau.safetensors --signs signs.h5 --mask-mode soft1 --out sweep-{task}.safetensors
apply --base base.safetensors --task-vector tau.safetensors --alpha 0.5 --out sweep-{task}.h5
SWEEP
check "sweep array runs (3 tasks)" \
  sbatch --wait --quiet "${small[@]}" --array=0-2 --output=sweep-%a.out "$repo/slurm/gradfix-sweep.sbatch" sweep.txt
check "sweep task 1 equals a plain run" cmp -s reference.safetensors sweep-1.safetensors
check "sweep tasks 0 and 2 wrote their outputs" test -s sweep-0.safetensors -a -s sweep-2.h5

# A gradfix sweep config as a job array (one point per array task), then --collect: the same
# table as the sweep run in one process. Needs the LibTorch part (the points are transports).
if [ -x "$(dirname "$gradfix")/gradfix-torch" ]; then
  clip=$repo/tests/fixtures/clip
  "$gradfix" convert "$clip/images.safetensors" images.h5 >/dev/null
  "$gradfix" generate --like "$clip/model" --like-scale 0 --noise 0.02 --seed 4 --include '^vision_model\.|^visual_projection' \
    --out clip_tau.safetensors >/dev/null
  cat >points.ini <<INI
[sweep]
out = OUT
seed = 0,1,2
[transport]
target = $clip/model
head = $clip/head.safetensors
task-vector = clip_tau.safetensors
num-samples = 2
support-size = 3
alphas = 0.5,1
no-few-shot-baseline = true
[task.tiny]
data = images.h5
test-data = images.h5
INI
  sed 's/^out = OUT/out = array/' points.ini >array.ini
  sed 's/^out = OUT/out = local/' points.ini >local.ini
  check "the sweep config has 3 points" test "$("$gradfix" sweep --config array.ini --count)" = 3
  check "a sweep config as a job array (3 points)" \
    sbatch --wait --quiet "${small[@]}" --array=0-2 --output=points-%a.out "$repo/slurm/gradfix-sweep.sbatch" array.ini
  "$gradfix" sweep --config array.ini --collect >/dev/null
  "$gradfix" sweep --config local.ini >/dev/null
  check "the array's table equals a local sweep's" cmp -s <(sed 1d array/table.md) <(sed 1d local/table.md)
  check "the array's results.csv equals a local sweep's" cmp -s array/results.csv local/results.csv
fi
finish
