#!/usr/bin/env bash
# debian-rootfs.sh [NAME [PACKAGES]] — make (once) a Debian 12 minbase root filesystem tar, the kind
# `docker export` writes, and print its path. PACKAGES (comma-separated) are added with
# debootstrap --include. Needs root (debootstrap) the first time.
#
# The tar is cached as NAME.tar in $VIRTKIT_FIXTURES, else ${VIRTKIT_CACHE:-~/.cache/virtkit}/fixtures.
# It is the one builder of this fixture: quickstart, the benches and the tests
# (imagetest.DebianRootfs) all come here. Concurrent callers wait on a lock and the first one
# builds; entries are sorted, owners numeric and mtimes clamped, so the bytes depend only on
# what debootstrap installed.
set -euo pipefail
name=${1:-debian-bookworm-minbase}
include=${2:-}
cache=${VIRTKIT_FIXTURES:-${VIRTKIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/virtkit}/fixtures}
out="$cache/$name.tar"
if [ -s "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
exec 9>"$out.lock"
flock 9
if [ -s "$out" ]; then echo "$out"; exit 0; fi
work=$(mktemp -d "$cache/.$name.XXXXXX")
trap 'rm -rf "$work"' EXIT
args=(--variant=minbase)
[ -n "$include" ] && args+=(--include="$include")
echo "debian-rootfs: debootstrap ${args[*]} bookworm (once; cached in $cache)" >&2
debootstrap "${args[@]}" bookworm "$work/root" http://deb.debian.org/debian >"$work/log" 2>&1 || {
  tail -20 "$work/log" >&2; exit 1; }
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" --sort=name --numeric-owner --xattrs --mtime=@1700000000 --clamp-mtime -cf "$work/out.tar" .
mv "$work/out.tar" "$out"
echo "$out"
