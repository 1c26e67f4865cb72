#!/usr/bin/env bash
# Side-by-side benchmark: `virtkit convert` against the pipeline a user would script
# (skopeo copy + umoci unpack + mke2fs -d), on the same Debian image served by a local registry,
# cold (empty caches) and warm (everything from a previous run still there). Prints medians and
# ratios. Needs root (umoci unpack keeps owners), skopeo, umoci, mke2fs; builds virtkit itself.
#
#   bench/convert/run.sh [ROOTFS.tar]   (default: the debootstrap fixture of imaging/imagetest)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOTFS=${1:-${VIRTKIT_FIXTURES:-$HOME/.cache/virtkit/fixtures}/debian-bookworm-minbase.tar}
COLD=${COLD:-3}
WARM=${WARM:-5}
[ -f "$ROOTFS" ] || { echo "no rootfs tar at $ROOTFS (run the imaging tests once, or give one)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/vk-bench-convert-XXXX)
REG_PID=
cleanup() { [ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

go build -o "$WORK/bin/virtkit" ./cmd/virtkit
go build -o "$WORK/bin/virtkit-agent" ./cmd/virtkit-agent 2>/dev/null || cp dist/virtkit-agent "$WORK/bin/virtkit-agent"
go build -o "$WORK/bin/benchreg" ./bench/convert/benchreg
"$WORK/bin/benchreg" -rootfs "$ROOTFS" > "$WORK/ref" &
REG_PID=$!
for _ in $(seq 300); do [ -s "$WORK/ref" ] && break; sleep 0.1; done
REF=$(cat "$WORK/ref")
echo "image: $REF ($(du -h "$ROOTFS" | cut -f1) rootfs)"

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

vk() { # $1 = state root
  XDG_STATE_HOME="$1/state" XDG_CACHE_HOME="$1/cache" VIRTKIT_CONFIG=/dev/null \
    "$WORK/bin/virtkit" convert -q --insecure "$REF" > /dev/null
}
peer() { # $1 = work dir; a user's script: copy, unpack, make the filesystem
  local d=$1
  skopeo copy -q --src-tls-verify=false "docker://$REF" "oci:$d/layout:img"
  rm -rf "$d/bundle"
  umoci unpack --image "$d/layout:img" "$d/bundle" > /dev/null
  local kib; kib=$(du -sk "$d/bundle/rootfs" | cut -f1)
  rm -f "$d/rootfs.ext4"
  mke2fs -q -t ext4 -d "$d/bundle/rootfs" "$d/rootfs.ext4" "$(( kib * 12 / 10 + 65536 ))k"
}

run() { # $1 = name, $2 = cold|warm, $3 = function
  local name=$1 mode=$2 fn=$3 n t0 t1
  n=$COLD; [ "$mode" = warm ] && n=$WARM
  for i in $(seq "$n"); do
    local d="$WORK/$name-$mode"
    [ "$mode" = cold ] && d="$WORK/$name-cold-$i"
    mkdir -p "$d"
    sync; t0=$(now); "$fn" "$d"; t1=$(now)
    echo "$t1 - $t0" | bc
  done | median
}

echo "runs: $COLD cold, $WARM warm (medians, seconds)"
vk_cold=$(run virtkit cold vk)
vk "$WORK/virtkit-warm" # prime
vk_warm=$(run virtkit warm vk)
peer_cold=$(run peer cold peer)
mkdir -p "$WORK/peer-warm"; peer "$WORK/peer-warm"
peer_warm=$(run peer warm peer)

printf '%-34s %10s %10s\n' "" cold warm
printf '%-34s %10.3f %10.3f\n' "virtkit convert" "$vk_cold" "$vk_warm"
printf '%-34s %10.3f %10.3f\n' "skopeo + umoci + mke2fs -d" "$peer_cold" "$peer_warm"
printf '%-34s %9.1fx %9.1fx\n' "speed-up (peer / virtkit)" "$(echo "$peer_cold / $vk_cold" | bc -l)" "$(echo "$peer_warm / $vk_warm" | bc -l)"
printf 'virtkit warm hit: %.1f ms (goal < 50 ms); cold speed-up goal >= 3x\n' "$(echo "$vk_warm * 1000" | bc -l)"
