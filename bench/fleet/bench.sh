#!/usr/bin/env bash
# bench/fleet/bench.sh — dev fleet timings on real microVMs (QEMU; TCG where KVM is unusable):
#   1. `virtkit fleet up` of a builder + 2 services from cached images (converted once, first),
#      cold (nothing running) and warm (`up` again: every unit unchanged);
#   2. `virtctl stop redis` / `virtctl start redis` from inside the builder: start returns when
#      the unit's health check passes, so it is "virtctl start → unit healthy".
# There is no side-by-side peer on this machine (no docker compose); the numbers stand alone.
# Needs root the first time (debootstrap fixture). Usage: bench/fleet/bench.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
./build.sh >/dev/null
img=tar:$(deploy/debian-rootfs.sh debian-bookworm-redis redis-server,redis-tools)
tmp=$(mktemp -d)
serve_pid=
cleanup() {
  [ -n "$serve_pid" ] && { dist/virtkit fleet down -f "$tmp/virtkit.yaml" >/dev/null 2>&1 || true; kill "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null || true; }
  rm -rf "$tmp"
}
trap cleanup EXIT
export VIRTKIT_STATE_DIR=$tmp/state VIRTKIT_CONFIG=$tmp/none.toml VIRTKIT_LOG_LEVEL=warn
export VIRTKIT_VM_KERNEL=${VIRTKIT_KERNEL:-$PWD/dist/vmlinux}
: > "$tmp/none.toml"
mkdir -p "$tmp/project"
cat > "$tmp/virtkit.yaml" <<YAML
name: bench
units:
  redis:
    image: $img
    memory: 256M
    command: [redis-server, --protected-mode, "no", --dir, /data]
    volumes: [{name: data, path: /data, size: 64M}]
    healthcheck: {test: [redis-cli, ping], interval: 200ms}
  cache:
    image: $img
    memory: 256M
    command: [redis-server, --protected-mode, "no", --save, ""]
    healthcheck: {test: [redis-cli, ping], interval: 200ms}
  builder:
    image: $img
    mode: agent
    memory: 384M
    depends_on: [redis, cache]
    shares: [{host: ./project, guest: /src}]
    virtctl: true
YAML
VIRTKIT_LOG_LEVEL=info dist/virtkit serve >"$tmp/serve.log" 2>&1 &
serve_pid=$!
until [ -e "$tmp/state/broker/endpoint.json" ]; do sleep 0.1; done
vk() { dist/virtkit "$@"; }
# On a failure the daemon's log and the VMs' consoles are kept for a look.
keep() { local d; d=$(mktemp -d "${TMPDIR:-/tmp}/fleet-bench-fail.XXXXXX"); cp "$tmp/serve.log" "$d/"
  for c in "$tmp"/state/vms/*/console.log; do [ -e "$c" ] && cp "$c" "$d/$(basename "$(dirname "$c")").console.log"; done
  echo "kept the daemon log and consoles in $d" >&2; }
ms() { local t0=$(date +%s%N); "$@" >"$tmp/last.log" 2>&1 || { echo "failed: $*" >&2; cat "$tmp/last.log" >&2; keep; return 1; }; echo $(( ($(date +%s%N) - t0) / 1000000 )); }

echo "converting the image once (cached afterwards): $(ms vk fleet up -f "$tmp/virtkit.yaml") ms (first up, includes conversion)"
vk fleet down -f "$tmp/virtkit.yaml" >/dev/null 2>&1
printf '%-8s %14s %14s %16s %16s\n' round "up-cold(ms)" "up-warm(ms)" "virtctl-stop" "virtctl-start"
for r in $(seq "$rounds"); do
  cold=$(ms vk fleet up -f "$tmp/virtkit.yaml")
  warm=$(ms vk fleet up -f "$tmp/virtkit.yaml")
  stop=$(ms vk fleet exec -f "$tmp/virtkit.yaml" builder -- virtctl stop redis)
  start=$(ms vk fleet exec -f "$tmp/virtkit.yaml" builder -- virtctl start redis)
  vk fleet exec -f "$tmp/virtkit.yaml" builder -- redis-cli -h redis.lan ping | grep -q PONG
  printf '%-8s %14s %14s %16s %16s\n' "$r" "$cold" "$warm" "$stop" "$start"
  vk fleet down -f "$tmp/virtkit.yaml" >/dev/null 2>&1
done
echo "(3 units: builder + redis + cache, booted in dependency order, each waiting for its health check; $(nproc) cores)"
