#!/bin/sh
# Open MPI's launch agent for the multi-host tests (--mca plm_rsh_agent), in place of ssh: called
# as `agent.sh [ssh options] HOST COMMAND...`, it runs COMMAND with a shell inside HOST's network
# namespace, under HOST's own host name, as sshd would run it on that node. HOST is an address
# listed in $GRADFIX_MULTIHOST_HOSTS ("ADDRESS NAME NETNS" per line, written by hosts.sh).
while [ $# -gt 0 ]; do
  case $1 in
    -*) shift ;;
    *) break ;;
  esac
done
address=$1
shift
line=$(grep "^$address " "${GRADFIX_MULTIHOST_HOSTS:?agent.sh needs GRADFIX_MULTIHOST_HOSTS}")
[ -n "$line" ] || { echo "agent.sh: no host $address in $GRADFIX_MULTIHOST_HOSTS" >&2; exit 255; }
name=$(echo "$line" | cut -d' ' -f2)
netns=$(echo "$line" | cut -d' ' -f3)
# As hosts.sh's host_run: the host's network, its host name, its /etc/hosts, its own /tmp.
exec nsenter --net="/run/netns/$netns" unshare --uts --mount /bin/sh -c \
  'hostname "$0" && mount --bind "/etc/netns/$1/hosts" /etc/hosts && mount -t tmpfs -o size=256m tmpfs /tmp && exec /bin/sh -c "$2"' \
  "$name" "$netns" "$*"
