#!/bin/sh
# Pre-create the tap pool of net.mode = "pool": N taps owned by the user `virtkit serve` runs as,
# attached to an existing bridge of the operator's network (which must serve DHCP). Run as root,
# e.g. from a systemd oneshot before virtkit.service; running it again changes nothing.
#
#   deploy/tap-pool.sh BRIDGE COUNT [USER] [PREFIX]     e.g. deploy/tap-pool.sh br0 4 virtkit vkpool
#
# then in /etc/virtkit/config.toml:
#
#   [net]
#   mode = "pool"
#   taps = ["vkpool0", "vkpool1", "vkpool2", "vkpool3"]    # at least [vm] capacity of them
#
# Each CI job VM leases one free tap for its life (never two jobs on one tap) and gets its address
# from the bridge's DHCP server with its kernel NIC (eth0). Jobs on pool taps see the operator's
# network, not a LAN of their own: isolate them there (VLAN, firewall) as that network requires.
set -eu
bridge=${1:?usage: tap-pool.sh BRIDGE COUNT [USER] [PREFIX]}
count=${2:?usage: tap-pool.sh BRIDGE COUNT [USER] [PREFIX]}
user=${3:-virtkit}
prefix=${4:-vkpool}
ip link show "$bridge" >/dev/null
i=0
names=""
while [ "$i" -lt "$count" ]; do
	tap="$prefix$i"
	if ! ip link show "$tap" >/dev/null 2>&1; then
		ip tuntap add "$tap" mode tap user "$user"
	fi
	ip link set "$tap" master "$bridge" up
	names="$names${names:+, }\"$tap\""
	i=$((i + 1))
done
echo "taps = [$names]"
