#!/usr/bin/env bash
# test.sh — the whole virtkit test suite on a fresh Debian 12 machine (run as root: namespaces,
# taps and real VMs under QEMU are part of it). Installs what it needs, builds the guest kernel
# (cached), then runs every test. Extra arguments go to `go test` (e.g. -run, -short).
set -euo pipefail
cd "$(dirname "$0")"
./deploy/install-deps.sh
./build-kernel.sh
./build.sh
export VIRTKIT_KERNEL=${VIRTKIT_KERNEL:-$PWD/dist/vmlinux}
"$(go env GOPATH)/bin/gotestsum" --format pkgname-and-test-fails --format-hide-empty-pkg \
  --jsonfile "${TEST_JSON:-/tmp/virtkit-test.json}" -- -count=1 -timeout 75m "$@" ./...
