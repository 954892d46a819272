#!/usr/bin/env bash
# The Slurm scripts across hosts: slurmctld on host3 and one slurmd on each of host1 and host2
# (hosts.sh: network namespaces, each slurmd with its own NodeName, NodeAddr and host name), from
# Debian's slurm-wlm, munge shared through its socket. slurm/gradfix-multi-node.sbatch runs as
# written with --nodes=2 (srun --mpi=pmix across the hosts) and writes what one process writes;
# the sweep array's tasks run on both nodes. Skipped (exit 77) where namespaces cannot be made.
#   slurm_hosts_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
source "$repo/tests/multihost/hosts.sh"
source "$repo/tests/slurm/slurm_common.sh"
hosts_or_skip
require_slurm
# Under the hosts' shared directory: each host has its own /tmp.
work=$(mktemp -d "$shared_dir"/gradfix-slurm-hosts-XXXXXX)
chmod 755 "$work"
# hosts_down kills every process in the hosts (slurmctld, slurmd, job steps); munged runs outside
# and is waited for, as it writes its log on the way out. Each step may fail without stopping the
# rest of the clean-up.
hosts_cleanup_extra="stop_munge '$work' || true; if [ \"\${failed:-0}\" -ne 0 ]; then tail -n 15 '$work'/*.log >&2 || true; fi; rm -rf '$work' || true"
hosts_up 3

start_munge "$work"

mkdir -p "$work/state" "$work/spool/host1" "$work/spool/host2" "$work/jobs"
chmod 755 "$work/spool" "$work/spool/host1" "$work/spool/host2"
cat >"$work/slurm.conf" <<CONF
ClusterName=gradfixhosts
SlurmctldHost=host3(${host_ip[3]})
SlurmctldPort=16827
SlurmdPort=16828
$(slurm_conf_common "$work")
SlurmdSpoolDir=$work/spool/%n
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd-%n.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd-%n.log
NodeName=host1 NodeAddr=${host_ip[1]} CPUs=4 RealMemory=2000 Gres=gpu:4 State=UNKNOWN
NodeName=host2 NodeAddr=${host_ip[2]} CPUs=4 RealMemory=2000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=host1,host2 Default=YES MaxTime=INFINITE State=UP
CONF
slurm_gpu_files "$work"
export SLURM_CONF=$work/slurm.conf

host_run 3 slurmctld -f "$SLURM_CONF"
host_run 1 slurmd -f "$SLURM_CONF"
host_run 2 slurmd -f "$SLURM_CONF"
for _ in $(seq 150); do
  states=$(sinfo -h -N -o "%N %t" 2>/dev/null | sort | tr '\n' ' ' || true)
  [ "$states" = "host1 idle host2 idle " ] && break
  sleep 0.2
done
check "both nodes come up idle (sinfo: '${states:-none}')" test "${states:-}" = "host1 idle host2 idle "

cd "$work/jobs"
mask_job_inputs "$gradfix"

export GRADFIX_BIN=$gradfix
small=(--time=5 --cpus-per-task=1)
check "multi-node script runs on 2 nodes x 2 ranks" \
  sbatch --wait --quiet "${small[@]}" --nodes=2 --ntasks-per-node=2 --gpus-per-node=2 --output=multi.out \
  "$repo/slurm/gradfix-multi-node.sbatch" mask --task-vector tau.safetensors --signs signs.h5 --mask-mode soft1 --out multi
check "multi-node output equals a plain run" "$repo/tests/support/same_tensors.py" reference.safetensors multi
check "the job's ranks ran on both hosts" grep -q "^gradfix: 2 hosts: host1 ranks 0-1, host2 ranks 2-3$" multi.out

cat >sweep.txt <<'SWEEP'
mask --task-vector tau.safetensors --signs signs.h5 --mask-mode normal --out sweep-{task}.safetensors
mask --task-vector tau.safetensors --signs signs.h5 --mask-mode soft1 --out sweep-{task}.safetensors
apply --base base.safetensors --task-vector tau.safetensors --alpha 0.5 --out sweep-{task}.h5
apply --base base.safetensors --task-vector tau.safetensors --alpha 0.25 --out sweep-{task}.h5
SWEEP
# Each task asks for all of a node's CPUs, so the four tasks spread over both nodes.
check "sweep array runs (4 tasks)" \
  sbatch --wait --quiet --time=5 --cpus-per-task=4 --array=0-3 --output=sweep-%a.out "$repo/slurm/gradfix-sweep.sbatch" sweep.txt
check "sweep task 1 equals a plain run" cmp -s reference.safetensors sweep-1.safetensors
check "sweep tasks 0, 2 and 3 wrote their outputs" test -s sweep-0.safetensors -a -s sweep-2.h5 -a -s sweep-3.h5
check "the array's tasks ran on both nodes" \
  test "$(cat sweep-*.out | sed -n 's/^gradfix-sweep: task [0-9]* on \(host[0-9]\):.*/\1/p' | sort -u | tr '\n' ' ')" = "host1 host2 "
finish
