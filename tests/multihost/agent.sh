#!/bin/sh
# Open MPI's launch agent for the multi-host tests (--mca plm_rsh_agent), in place of ssh: called
# as `agent.sh [ssh options] HOST COMMAND...`, it runs COMMAND with a shell inside HOST, as sshd
# would run it on that node. HOST is an address listed in $GRADFIX_MULTIHOST_HOSTS ("ADDRESS NAME
# NETNS" per line, written by hosts.sh, whose directory holds each host's /tmp layers).
while [ $# -gt 0 ]; do
  case $1 in
    -*) shift ;;
    *) break ;;
  esac
done
address=$1
shift
hosts=${GRADFIX_MULTIHOST_HOSTS:?agent.sh needs GRADFIX_MULTIHOST_HOSTS}
line=$(grep "^$address " "$hosts")
[ -n "$line" ] || { echo "agent.sh: no host $address in $hosts" >&2; exit 255; }
name=$(echo "$line" | cut -d' ' -f2)
netns=$(echo "$line" | cut -d' ' -f3)
exec nsenter --net="/run/netns/$netns" "$(dirname "$0")/enter_host.sh" "$name" "$netns" "$(dirname "$hosts")/$netns" /bin/sh -c "$*"
