#!/usr/bin/env bash
# bench/vm/bench.sh — microVM boot and run figures on this host (TCG where KVM is unusable; run the
# same script on a KVM host with Cloud Hypervisor for the real figure, goal <= 150 ms boot-to-ready):
#   1. boot-to-ready split (prepare, VMM start, kernel, agent init, ready, first exec), medians
#   2. `virtkit run IMAGE -- echo` from invocation to its first output line, cached image
#   3. memory overhead per idle VM (PSS of the VMM and its helpers, guest RAM 512 MiB)
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${N:-5}
./build.sh >/dev/null
img=$(./deploy/debian-rootfs.sh)
export VIRTKIT_STATE_DIR=$(mktemp -d /tmp/vk-bench-vm.XXXXXX) VIRTKIT_VM_KERNEL=${VIRTKIT_KERNEL:-$PWD/dist/vmlinux}
trap 'pkill -f "$VIRTKIT_STATE_DIR" 2>/dev/null || true; rm -rf "$VIRTKIT_STATE_DIR"' EXIT

echo "== 1. boot-to-ready split (median of $n boots)"
VIRTKIT_KERNEL=$VIRTKIT_VM_KERNEL go test -run '^$' -bench BootToReady -benchtime ${n}x ./workers/launcher/ | grep -E '^Benchmark' |
  tr -s ' \t' '\n' | awk '/-ms$/ { printf "  %-12s %10.1f ms\n", substr($0, 1, length($0)-3), prev } { prev = $0 }'

echo "== 2. virtkit run → first output line (cached image, one-shot broker, $n runs)"
dist/virtkit run --net none "tar:$img" -- true >/dev/null 2>&1 # warm the bundle cache
for i in $(seq "$n"); do
  start=$(date +%s%N)
  dist/virtkit run --net none "tar:$img" -- echo first-line 2>/dev/null | { read -r _; echo $(( ($(date +%s%N) - start) / 1000000 )); cat >/dev/null; }
done | sort -n | awk '{ a[NR] = $1 } END { printf "  median %d ms, min %d ms, max %d ms\n", a[int((NR+1)/2)], a[1], a[NR] }'

echo "== 3. memory overhead per idle VM (guest RAM 512 MiB; PSS of VMM + helpers)"
dist/virtkit serve >/dev/null 2>&1 &
serve=$!
for i in $(seq 50); do [ -f "$VIRTKIT_STATE_DIR/broker/endpoint.json" ] && break; sleep 0.1; done
for i in 1 2; do dist/virtkit run -d --name idle$i --net none "tar:$img" -- true >/dev/null 2>&1; done
sleep 5
for vm in idle1 idle2; do
  dir="$VIRTKIT_STATE_DIR/vms/$vm"
  pss=0
  for pid in $(cat "$dir"/*.pid 2>/dev/null); do
    p=$(awk '/^Pss:/ { s += $2 } END { print s+0 }' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
    pss=$((pss + p))
  done
  echo "  $vm: $((pss / 1024)) MiB PSS (VMM + vsock backend)"
done
kill -TERM "$serve"; wait "$serve" || true
