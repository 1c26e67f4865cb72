#!/usr/bin/env bash
# quickstart.sh — on a fresh Debian 12 machine (as root): install what virtkit needs, build the
# guest kernel (once, cached) and the binaries, make a small Debian image (once, cached), then boot
# it as a microVM and run a command in it.
set -euo pipefail
cd "$(dirname "$0")"
./deploy/install-deps.sh
./build-kernel.sh
./build.sh
image=$(./deploy/debian-rootfs.sh)
echo "quickstart: virtkit run tar:$image -- ..."
exec dist/virtkit run "tar:$image" -- sh -c 'echo "hello from $(hostname), a microVM"; uname -sr; . /etc/os-release; echo "$PRETTY_NAME"'
