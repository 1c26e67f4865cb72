#!/usr/bin/env bash
# build-kernel.sh — build the virtkit guest kernel (dist/vmlinux) reproducibly from the pinned source.
#
# The source is Debian's linux-source package (offline) checked against the SHA-256 in pins.env.
# The result is cached outside the repo under $VIRTKIT_CACHE/kernel/<hash of inputs>/, so a machine
# builds it once; dist/vmlinux is a copy of the cached file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
# shellcheck source=pins.env
. ./pins.env
cache=${VIRTKIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/virtkit}
jobs=${JOBS:-$(nproc)}

if [ ! -f "$KERNEL_TARBALL" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq --no-install-recommends "$KERNEL_DEB_PACKAGE" >/dev/null
  else
    echo "build-kernel: $KERNEL_TARBALL missing: install $KERNEL_DEB_PACKAGE" >&2; exit 1
  fi
fi
echo "$KERNEL_TARBALL_SHA256  $KERNEL_TARBALL" | sha256sum -c --quiet - || {
  echo "build-kernel: $KERNEL_TARBALL does not match the pinned SHA-256 (run ./update.sh)" >&2; exit 1; }

key=$( { echo "$KERNEL_TARBALL_SHA256"; cat kernel/microvm.config; echo v1; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
mkdir -p dist
if [ -f "$out/vmlinux" ]; then
  echo "build-kernel: cached $out/vmlinux"
  cp -f "$out/vmlinux" dist/vmlinux
  exit 0
fi

start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/vk-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build-kernel: unpacking $(basename "$KERNEL_TARBALL")"
tar -C "$work" -xf "$KERNEL_TARBALL"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -1)
export KBUILD_BUILD_TIMESTAMP="2024-01-01 00:00:00 UTC" KBUILD_BUILD_USER=virtkit KBUILD_BUILD_HOST=virtkit KBUILD_BUILD_VERSION=1
(
  cd "$src"
  make -s tinyconfig
  ./scripts/kconfig/merge_config.sh -m .config "$here/kernel/microvm.config" >/dev/null
  make -s olddefconfig
  missing=$(grep -v '^#' "$here/kernel/microvm.config" | grep . | while read -r line; do grep -qx "$line" .config || echo "$line"; done)
  [ -z "$missing" ] || { echo "build-kernel: options not applied:"; echo "$missing"; } >&2
  echo "build-kernel: make -j$jobs vmlinux"
  make -s -j"$jobs" vmlinux
)
mkdir -p "$out"
cp "$src/vmlinux" "$out/vmlinux.tmp" && cp "$src/.config" "$out/config"
mv "$out/vmlinux.tmp" "$out/vmlinux"
cp -f "$out/vmlinux" dist/vmlinux
echo "build-kernel: built $out/vmlinux in $(( $(date +%s) - start ))s"
