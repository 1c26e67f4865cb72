#!/usr/bin/env bash
# debian-rootfs.sh [NAME [PACKAGES]] — make (once) a Debian 12 minbase root filesystem tar, the kind
# `docker export` writes, cached under ${VIRTKIT_CACHE:-~/.cache/virtkit}/fixtures/NAME.tar, and print
# its path. PACKAGES (comma-separated) are added with debootstrap --include. Needs root (debootstrap).
set -euo pipefail
name=${1:-debian-bookworm-minbase}
include=${2:-}
cache=${VIRTKIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/virtkit}/fixtures
out="$cache/$name.tar"
if [ -s "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.$name.XXXXXX")
trap 'rm -rf "$work"' EXIT
args=(--variant=minbase)
[ -n "$include" ] && args+=(--include="$include")
echo "debian-rootfs: debootstrap ${args[*]} bookworm (once; cached in $cache)" >&2
debootstrap "${args[@]}" bookworm "$work/root" http://deb.debian.org/debian >"$work/log" 2>&1 || {
  tail -20 "$work/log" >&2; exit 1; }
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" --sort=name --numeric-owner --xattrs -cf "$work/out.tar" .
mv "$work/out.tar" "$out"
echo "$out"
