# Shared by the Slurm tests (sourced): the commands they need, munge, the slurm.conf lines every
# test cluster has, the GPU stand-ins, and the small job inputs with a plain run's output.

require_slurm() {  # slurm-wlm and munge come from launch/setup: tests install nothing
  local command
  for command in slurmctld slurmd munged sbatch; do
    command -v "$command" >/dev/null || { echo "$(basename "$0"): $command is missing; run launch/setup (it installs slurm-wlm and munge)" >&2; exit 1; }
  done
  [ "$(id -u)" -eq 0 ] || { echo "$(basename "$0"): slurmd must run as root" >&2; exit 1; }
}

start_munge() {  # start_munge WORK: a fresh key and a private socket under WORK
  dd if=/dev/urandom of="$1/munge.key" bs=1024 count=1 status=none
  chmod 400 "$1/munge.key"
  munged --force --key-file="$1/munge.key" --socket="$1/munge.socket" --pid-file="$1/munged.pid" \
    --log-file="$1/munged.log" --seed-file="$1/munge.seed"
}

stop_munge() {  # stop_munge WORK: ends start_munge's daemon and waits for it, so that nothing writes under WORK after
  local pid
  [ -f "$1/munged.pid" ] && pid=$(cat "$1/munged.pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
}

# slurm_conf_common WORK: the lines of slurm.conf that do not depend on the nodes. The scripts ask
# for GPUs per node; the nodes declare four each, with plain files for device files
# (slurm_gpu_files), and the CPUs they declare are accepted where the machine has fewer cores.
slurm_conf_common() {
  cat <<CONF
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$1/munge.socket
StateSaveLocation=$1/state
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
CONF
}

slurm_gpu_files() {  # slurm_gpu_files WORK: Slurm counts GPUs by their device files
  touch "$1/gpu0" "$1/gpu1" "$1/gpu2" "$1/gpu3"
  echo "Name=gpu File=$1/gpu[0-3]" >"$1/gres.conf"
}

# mask_job_inputs GRADFIX: base, tau and signs in the current directory, and reference.safetensors,
# the soft1 mask a plain run writes.
mask_job_inputs() {
  "$1" generate --shapes "embed=300x64,w=64x64,b=64,v=10000" --seed 1 --out base.safetensors >/dev/null
  "$1" generate --like base.safetensors --like-scale 0 --noise 0.01 --seed 2 --out tau.safetensors >/dev/null
  "$1" generate --like base.safetensors --like-scale 0 --noise 1 --seed 3 --out signs.h5 >/dev/null
  "$1" mask --task-vector tau.safetensors --signs signs.h5 --mask-mode soft1 --out reference.safetensors >/dev/null
}
