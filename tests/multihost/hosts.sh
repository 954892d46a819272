# Hosts made real enough on one machine, for the multi-host tests (sourced): each host is a Linux
# network namespace with its own address on a bridge, and its processes run with their own host
# name (a UTS namespace), their own /etc/hosts and their own /tmp (a mount namespace). mpirun
# reaches them through agent.sh, as it would reach nodes over ssh. The addresses exist only inside
# the namespaces made here. Everything is removed by hosts_down, which hosts_up arranges to run on
# exit and on SIGINT, SIGTERM and SIGHUP; a run killed outright (SIGKILL) is cleaned up by the
# next hosts_up, which removes the hosts of runs whose process is gone.
#
#   hosts_up N          makes hosts 1..N; sets host_ip[i], host_name[i], host_netns[i], subnet;
#                       exports GRADFIX_MULTIHOST_HOSTS (the hosts file) for agent.sh
#   hosts_down          kills every process left in the hosts, removes namespaces, links, bridge
#   host_run I CMD...   runs CMD inside host I
#   mpirun_hosts S...   mpirun_host_flags: the options that start S_i ranks on host i over TCP
#   can_make_hosts      whether this machine lets us (root, iproute2, util-linux, overlayfs)
#   hosts_or_skip       exit 77 (ctest's skip) where it does not

multihost_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# What the hosts share, like a cluster's shared file system: the tests' work directories and
# each run's own directory (its hosts file and the hosts' private /tmp layers).
shared_dir=${GRADFIX_MULTIHOST_SHARED:-/var/tmp}
declare -a host_ip host_name host_netns
hosts_tag=""
hosts_bridge=""
hosts_run_dir=""
subnet=""

can_make_hosts() {
  [ "$(id -u)" -eq 0 ] || { echo "not root"; return 1; }
  local command
  for command in ip unshare nsenter; do
    command -v "$command" >/dev/null || { echo "$command (iproute2 or util-linux) is missing"; return 1; }
  done
  local probe="gfxprobe$$" layers
  ip netns add "$probe" 2>/dev/null || { echo "cannot make a network namespace (ip netns add)"; return 1; }
  ip netns del "$probe"
  ip link add "gfxpb$$" type bridge 2>/dev/null || { echo "cannot make a bridge"; return 1; }
  ip link del "gfxpb$$"
  layers=$(mktemp -d "$shared_dir/gradfix-probe-XXXXXX")
  mkdir "$layers/up" "$layers/work"
  if ! unshare --uts --mount /bin/sh -c "mount -t overlay overlay -o lowerdir=/tmp,upperdir=$layers/up,workdir=$layers/work /tmp" 2>/dev/null; then
    rm -rf "$layers"
    echo "cannot make UTS and mount namespaces with an overlay /tmp (unshare --uts --mount, overlayfs)"
    return 1
  fi
  rm -rf "$layers"
}

# For a test: exits 77 (ctest's skip) with the reason where hosts cannot be made here.
hosts_or_skip() {
  local reason
  if ! reason=$(can_make_hosts); then
    echo "SKIPPED: cannot make hosts here: $reason"
    exit 77
  fi
}

# remove_hosts RUN_DIR: kills the processes of a run's hosts and removes them (its namespaces,
# their /etc/netns entries, its bridge) and the run directory. Deleting a namespace deletes the
# veth pair whose one end is in it.
remove_hosts() {
  local run=$1 address name netns pids
  while read -r address name netns; do
    pids=$(ip netns pids "$netns" 2>/dev/null || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  done <"$run/hosts"
  while read -r address name netns; do
    ip netns del "$netns" 2>/dev/null || true
    rm -rf "/etc/netns/$netns"
  done <"$run/hosts"
  [ ! -f "$run/bridge" ] || ip link del "$(cat "$run/bridge")" 2>/dev/null || true
  rm -rf "$run"
}

# process_identity PID: "PID START" while the process lives (START: its start time, so that a
# reused PID is another process), nothing once it has exited (a zombie counts as exited).
process_identity() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }  # the fields after the command name, which may hold spaces
  set -- "$1" $stat
  [ "$2" != Z ] && echo "$1 ${21}"
  return 0
}

hosts_up() {
  local count=$1 i run owner
  # Leftovers of runs that were killed outright.
  for run in "$shared_dir"/gradfix-hosts-*/; do
    [ -f "$run/owner" ] || continue
    owner=$(cat "$run/owner")
    [ "$(process_identity "${owner%% *}")" = "$owner" ] || remove_hosts "${run%/}"
  done
  hosts_tag=$(printf '%04d' $(( $$ % 10000 )))
  local octet=$(( ($$ % 200) + 20 ))
  subnet="10.77.$octet.0/24"
  hosts_bridge="gfxbr$hosts_tag"
  hosts_run_dir=$(mktemp -d "$shared_dir/gradfix-hosts-XXXXXX")
  process_identity $$ >"$hosts_run_dir/owner"
  echo "$hosts_bridge" >"$hosts_run_dir/bridge"
  : >"$hosts_run_dir/hosts"
  export GRADFIX_MULTIHOST_HOSTS=$hosts_run_dir/hosts
  trap hosts_down EXIT
  trap 'hosts_down; trap - EXIT; exit 130' INT
  trap 'hosts_down; trap - EXIT; exit 143' TERM HUP
  ip link add "$hosts_bridge" type bridge
  ip addr add "10.77.$octet.1/24" dev "$hosts_bridge"
  ip link set "$hosts_bridge" up
  for i in $(seq 1 "$count"); do
    host_name[$i]="host$i"
    host_netns[$i]="gfx$hosts_tag-h$i"
    host_ip[$i]="10.77.$octet.$((10 + i))"
    ip netns add "${host_netns[$i]}"
    ip link add "gfx${hosts_tag}v$i" type veth peer name "gfx${hosts_tag}p$i"
    ip link set "gfx${hosts_tag}v$i" master "$hosts_bridge" up
    ip link set "gfx${hosts_tag}p$i" netns "${host_netns[$i]}"
    ip -n "${host_netns[$i]}" link set "gfx${hosts_tag}p$i" name eth0
    ip -n "${host_netns[$i]}" addr add "${host_ip[$i]}/24" dev eth0
    ip -n "${host_netns[$i]}" link set eth0 up
    ip -n "${host_netns[$i]}" link set lo up
    mkdir -p "$hosts_run_dir/${host_netns[$i]}/up" "$hosts_run_dir/${host_netns[$i]}/work"
    echo "${host_ip[$i]} ${host_name[$i]} ${host_netns[$i]}" >>"$hosts_run_dir/hosts"
  done
  # Names resolve inside the hosts: host_run and agent.sh put /etc/netns/NETNS/hosts over /etc/hosts.
  for i in $(seq 1 "$count"); do
    mkdir -p "/etc/netns/${host_netns[$i]}"
    { echo "127.0.0.1 localhost"; awk '{ print $1, $2 }' "$hosts_run_dir/hosts"; } >"/etc/netns/${host_netns[$i]}/hosts"
  done
}

hosts_down() {
  [ -n "$hosts_run_dir" ] && [ -d "$hosts_run_dir" ] && remove_hosts "$hosts_run_dir"
  [ -n "${hosts_cleanup_extra:-}" ] && eval "$hosts_cleanup_extra"
  return 0
}

# A host's processes run in its network namespace (nsenter, not `ip netns exec`, which would mount
# a /sys without the machine's cgroup file systems, and slurmd needs them), with its own host
# name, its own /etc/hosts, and its own /tmp: an overlay on the machine's, so that what is there
# (a build, a clone) stays visible, while what the host writes there (Slurm's PMIx directories,
# Open MPI's session files) is its own, as on separate nodes.
host_run() {
  local i=$1
  shift
  nsenter --net="/run/netns/${host_netns[$i]}" "$multihost_dir/enter_host.sh" "${host_name[$i]}" "${host_netns[$i]}" \
    "$hosts_run_dir/${host_netns[$i]}" "$@"
}

# mpirun_hosts SLOTS_1 SLOTS_2 ...: the options that start SLOTS_i ranks on host i, Open MPI's
# daemons through agent.sh, all traffic between hosts over TCP on the hosts' subnet (shared
# memory only within a host, as on a cluster), daemons started by mpirun itself (no tree
# spawn: each daemon would otherwise start others from inside its host).
mpirun_hosts() {
  local list="" i=1 slots
  for slots in "$@"; do
    list+="${list:+,}${host_ip[$i]}:$slots"
    i=$((i + 1))
  done
  mpirun_host_flags=(--host "$list" --mca plm_rsh_agent "$multihost_dir/agent.sh" --mca plm_rsh_no_tree_spawn 1
                     --mca oob_tcp_if_include "$subnet" --mca btl_tcp_if_include "$subnet" --mca btl self,vader,tcp)
}
