#!/usr/bin/env bash
# build.sh — reproducible static builds of virtkit and virtkit-agent into dist/.
#
# CGO_ENABLED=0, -trimpath, no build id, no VCS stamping (the commit is passed with -X), so two
# checkouts of the same tree in different folders give byte-identical binaries (cmd/buildtest proves it).
set -euo pipefail
cd "$(dirname "$0")"
. ./pins.env
out=${DIST:-dist}
mkdir -p "$out"

commit=$(git rev-parse -q --verify HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit-dirty"; fi
version=${VERSION:-$(git describe --tags --always 2>/dev/null || echo dev)}

export CGO_ENABLED=0 GOOS=linux GOARCH=${GOARCH:-amd64} GOAMD64=v1 GOFLAGS=-mod=readonly
flags=(-trimpath -buildvcs=false)
ld="-s -w -buildid= -extldflags=-static"
go build "${flags[@]}" -ldflags "$ld -X github.com/virtkit/virtkit/cmd/virtkit/cli.Version=$version" -o "$out/virtkit" ./cmd/virtkit
go build "${flags[@]}" -ldflags "$ld -X main.Version=$version" -o "$out/virtkit-agent" ./cmd/virtkit-agent

{
  echo "version: $version"
  echo "commit: $commit"
  echo "go: $(go env GOVERSION) (pinned $GO_VERSION)"
  echo "target: $(go env GOOS)/$(go env GOARCH) GOAMD64=v1 CGO_ENABLED=0"
  echo "kernel-source: $KERNEL_DEB_PACKAGE $KERNEL_DEB_VERSION sha256:$KERNEL_TARBALL_SHA256"
  echo "pins: $(grep -v '^#' pins.env | tr '\n' ' ')"
  for b in virtkit virtkit-agent; do
    echo "modules in $b:"
    go version -m "$out/$b" | awk '$1 == "dep" { print "  " $2, $3 }'
  done
} > "$out/build-info.txt"
(cd "$out" && sha256sum virtkit virtkit-agent build-info.txt > SHA256SUMS)
ls -l "$out/virtkit" "$out/virtkit-agent" | awk '{printf "build: %-20s %6.2f MiB\n", $9, $5/1048576}'
