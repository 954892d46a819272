# Hosts made real enough on one machine, for the multi-host tests (sourced): each host is a Linux
# network namespace with its own address on a bridge, and its processes run with their own host
# name (a UTS namespace). mpirun reaches them through agent.sh, as it would reach nodes over ssh.
# The addresses exist only inside the namespaces made here; everything is removed by hosts_down,
# which hosts_up arranges to run on exit, also when the test fails.
#
#   hosts_up N          makes hosts 1..N; sets host_ip[i], host_name[i], host_netns[i], hosts_file,
#                       subnet; exports GRADFIX_MULTIHOST_HOSTS for agent.sh
#   hosts_down          kills every process left in the hosts, removes namespaces, links, bridge
#   host_run I CMD...   runs CMD inside host I (its network and its host name)
#   mpirun_hosts        the mpirun options that start ranks on the hosts over TCP (an array)
#   can_make_hosts      whether this machine lets us (root, iproute2, unshare, nsenter)
#   hosts_or_skip       exit 77 (ctest's skip) where it does not

multihost_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Each host has its own /tmp, as nodes do (Slurm's PMIx and Open MPI keep per-node files there):
# what the hosts share, like a cluster's shared file system, lives here instead.
shared_dir=${GRADFIX_MULTIHOST_SHARED:-/var/tmp}
declare -a host_ip host_name host_netns
hosts_tag=""
hosts_bridge=""
hosts_file=""
subnet=""

can_make_hosts() {
  [ "$(id -u)" -eq 0 ] || { echo "not root"; return 1; }
  command -v ip >/dev/null && command -v unshare >/dev/null || { echo "ip (iproute2) or unshare missing"; return 1; }
  local probe="gfxprobe$$"
  ip netns add "$probe" 2>/dev/null || { echo "cannot make a network namespace (ip netns add)"; return 1; }
  ip netns del "$probe"
  ip link add "gfxpb$$" type bridge 2>/dev/null || { echo "cannot make a bridge"; return 1; }
  ip link del "gfxpb$$"
  unshare --uts --mount true 2>/dev/null || { echo "cannot make UTS and mount namespaces (unshare --uts --mount)"; return 1; }
  command -v nsenter >/dev/null || { echo "nsenter (util-linux) missing"; return 1; }
}

# For a test: exits 77 (ctest's skip) with the reason where hosts cannot be made here.
hosts_or_skip() {
  local reason
  if ! reason=$(can_make_hosts); then
    echo "SKIPPED: cannot make hosts here: $reason"
    exit 77
  fi
}

hosts_up() {
  local count=$1 i
  # A tag per test run: names and the subnet do not collide with another run's leftovers.
  hosts_tag=$(printf '%04d' $(( $$ % 10000 )))
  local octet=$(( ($$ % 200) + 20 ))
  subnet="10.77.$octet.0/24"
  hosts_bridge="gfxbr$hosts_tag"
  hosts_file=$(mktemp "$shared_dir/gradfix-hosts-XXXXXX")
  export GRADFIX_MULTIHOST_HOSTS=$hosts_file
  trap hosts_down EXIT
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
    echo "${host_ip[$i]} ${host_name[$i]} ${host_netns[$i]}" >>"$hosts_file"
  done
  # Names resolve inside the hosts: host_run and agent.sh put /etc/netns/NETNS/hosts over /etc/hosts.
  for i in $(seq 1 "$count"); do
    mkdir -p "/etc/netns/${host_netns[$i]}"
    { echo "127.0.0.1 localhost"; awk '{ print $1, $2 }' "$hosts_file"; } >"/etc/netns/${host_netns[$i]}/hosts"
  done
}

hosts_down() {
  local i pids
  for i in "${!host_netns[@]}"; do
    pids=$(ip netns pids "${host_netns[$i]}" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  done
  for i in "${!host_netns[@]}"; do
    ip netns del "${host_netns[$i]}" 2>/dev/null || true
    rm -rf "/etc/netns/${host_netns[$i]}"
    ip link del "gfx${hosts_tag}v$i" 2>/dev/null || true
  done
  [ -n "$hosts_bridge" ] && ip link del "$hosts_bridge" 2>/dev/null || true
  [ -n "$hosts_file" ] && rm -f "$hosts_file"
  [ -n "${hosts_cleanup_extra:-}" ] && eval "$hosts_cleanup_extra"
  return 0
}

# A host's processes run in its network namespace (nsenter, not `ip netns exec`, which would mount
# a /sys without the machine's cgroup file systems, and slurmd needs them), with its own host
# name (a UTS namespace), its own /etc/hosts and its own empty /tmp (a mount namespace).
host_run() {
  local i=$1
  shift
  nsenter --net="/run/netns/${host_netns[$i]}" unshare --uts --mount /bin/sh -c \
    'hostname "$0" && mount --bind "/etc/netns/$1/hosts" /etc/hosts && mount -t tmpfs -o size=256m tmpfs /tmp && shift && exec "$@"' \
    "${host_name[$i]}" "${host_netns[$i]}" "$@"
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
