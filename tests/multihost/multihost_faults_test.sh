#!/usr/bin/env bash
# A host lost mid-run. Three hosts (hosts.sh): mpirun runs on host3, as on a login node, and
# starts a CLIP transport with a long few-shot fine-tuning (many collectives) on host1 and host2,
# two ranks each. Then host2 goes away:
#   link cut    host2's network link is set down from outside: the ranks on host1 stop within
#               --timeout plus a few seconds, rank 0 naming host2's ranks and host; the whole job
#               (mpirun and every daemon) ends soon after
#   processes   every process on host2 is killed (its ranks and Open MPI's daemon): the job ends
# Each time nothing is published, no temporary file is left and no process is left on any host.
# The hosts' kernels give up on an unacknowledged TCP connection after 3 retransmissions
# (net.ipv4.tcp_retries2, set in each host's namespace): with the default 15, Open MPI's launcher
# waits about 15 minutes on the lost daemon after gradfix's ranks have stopped (docs/cluster.md).
#   multihost_faults_test.sh GRADFIX_BINARY
set -euo pipefail
gradfix=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
source "$repo/tests/mpi/common.sh"
source "$repo/tests/multihost/hosts.sh"
hosts_or_skip
fixtures=$repo/tests/fixtures/clip
# Under the hosts' shared directory: each host has its own /tmp.
work=$(mktemp -d "$shared_dir"/gradfix-multihost-faults-XXXXXX)
hosts_cleanup_extra="rm -rf '$work'"
hosts_up 3
for i in 1 2 3; do ip netns exec "${host_netns[$i]}" sysctl -qw net.ipv4.tcp_retries2=3; done
cd "$work"

"$gradfix" convert "$fixtures/images.safetensors" images.h5 >/dev/null
"$gradfix" generate --like "$fixtures/model" --like-scale 0 --noise 0.01 --seed 1 --include '^vision_model\.|^visual_projection' \
  --out tau.safetensors >/dev/null
printf '0\n1\n2\n' >shots.txt
timeout=5
job=(transport --target "$fixtures/model" --head "$fixtures/head.safetensors" --task-vector tau.safetensors --data images.h5
     --test-data images.h5 --indices shots.txt --support-size 3 --alphas 0.5 --finetune-lrs 1e-3 --finetune-steps 1,5000
     --timeout "$timeout")
mpirun_hosts 2 2

gradfix_pids() {  # gradfix_pids HOST: the gradfix processes left on that host
  local pid
  for pid in $(ip netns pids "${host_netns[$1]}"); do
    grep -q "gradfix" "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
  done
  return 0
}

# run_until_lost NAME ACTION: starts the job (its own session, on host3), waits until it is
# computing, runs ACTION, then measures when host1's ranks are gone and when mpirun returns.
run_until_lost() {
  local name=$1 action=$2
  GRADFIX_PROGRESS_SECONDS=0 host_run 3 setsid \
    mpirun "${mpirun_flags[@]}" -x GRADFIX_PROGRESS_SECONDS -np 4 "${mpirun_host_flags[@]}" "$gradfix" "${job[@]}" \
    --out "$work/$name" >"$name.log" 2>&1 &
  local launcher=$!
  for _ in $(seq 1 600); do
    grep -q "samples" "$name.log" 2>/dev/null && break
    sleep 0.1
  done
  sleep 1  # in the fine-tuning's collectives
  check "$name: the job is running on host1 and host2" test -n "$(gradfix_pids 1)" -a -n "$(gradfix_pids 2)"
  eval "$action"
  local start
  start=$(date +%s.%N)
  survivors_gone=""
  for _ in $(seq 1 600); do
    if [ -z "$(gradfix_pids 1)" ]; then
      survivors_gone=$(awk "BEGIN { print $(date +%s.%N) - $start }")
      break
    fi
    sleep 0.1
  done
  set +e
  wait "$launcher"
  code=$?
  set -e
  job_ended=$(awk "BEGIN { print $(date +%s.%N) - $start }")
  check "$name: the job fails (exit $code)" test "$code" -ne 0
  check "$name: nothing is published" test ! -e "$name"
  check "$name: no temporary file is left" test -z "$(ls -A | grep '^\.' || true)"
  sleep 1
  for i in 1 2 3; do
    check "$name: no process is left on host$i" test -z "$(ip netns pids "${host_netns[$i]}")"
  done
}

run_until_lost cut 'ip -n "${host_netns[2]}" link set eth0 down'
check "link cut: host1's ranks stopped within --timeout plus a few seconds (${survivors_gone:-never} s)" \
  awk "BEGIN { exit !(\"${survivors_gone}\" != \"\" && ${survivors_gone:-999} < $timeout + 10) }"
check "link cut: the whole job ended within a minute (${job_ended} s)" awk "BEGIN { exit !($job_ended < 60) }"
check "link cut: rank 0 names host2's ranks and host" \
  grep -q "rank(s) 2 on host2 (silent for [0-9]* s, last seen at #[0-9]*), 3 on host2 (silent for [0-9]* s, last seen at #[0-9]*) stopped answering" cut.log
echo "link cut: host1's ranks stopped ${survivors_gone:-never} s after the cut, mpirun returned after ${job_ended} s"
ip -n "${host_netns[2]}" link set eth0 up

run_until_lost killed 'kill -9 $(ip netns pids "${host_netns[2]}")'
check "killed: host1's ranks stopped within a few seconds (${survivors_gone:-never} s)" \
  awk "BEGIN { exit !(\"${survivors_gone}\" != \"\" && ${survivors_gone:-999} < 10) }"
echo "host2 killed: host1's ranks stopped ${survivors_gone:-never} s after the kill, mpirun returned after ${job_ended} s"
[ "$failed" -eq 0 ] || { tail -n 30 cut.log killed.log >&2 || true; }
finish
