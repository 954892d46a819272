#!/bin/sh
# The inside of a host (hosts.sh), entered from its network namespace: new UTS and mount
# namespaces with the host's name, its /etc/hosts and its own /tmp (an overlay on the machine's
# /tmp, whose layers are under LAYERS), then COMMAND.
#   nsenter --net=/run/netns/NETNS enter_host.sh NAME NETNS LAYERS COMMAND...
exec unshare --uts --mount /bin/sh -c '
  hostname "$1" &&
  mount --bind "/etc/netns/$2/hosts" /etc/hosts &&
  mount -t overlay overlay -o "lowerdir=/tmp,upperdir=$3/up,workdir=$3/work" /tmp &&
  shift 3 && exec "$@"' enter_host "$@"
