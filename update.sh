#!/usr/bin/env bash
# update.sh — bump what virtkit pins, all recorded in pins.env (which ./build.sh reports in
# dist/build-info.txt):
#   go       the Go toolchain: the newest release of the pinned series (GO_SERIES=1.27 to move to
#            another series), written to pins.env and as the `toolchain` line of go.mod
#   modules  every module: go get -u -t ./... then go mod tidy, then a build to prove it compiles
#   kernel   the guest kernel source: the installed linux-source-X.Y package (with --apt, upgraded
#            first), its version, tarball path and SHA-256
# Usage: ./update.sh [--apt] [go] [modules] [kernel]     (no part named: all three)
# Review with `git diff pins.env go.mod go.sum`, then ./build.sh and ./test.sh.
set -euo pipefail
cd "$(dirname "$0")"
. ./pins.env

apt=0 parts=()
for a in "$@"; do
  case "$a" in
    --apt) apt=1 ;;
    go|modules|kernel) parts+=("$a") ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "update: unknown argument $a (want go, modules, kernel or --apt)" >&2; exit 2 ;;
  esac
done
[ ${#parts[@]} -gt 0 ] || parts=(go modules kernel)
want() { local p; for p in "${parts[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }

# set_pin KEY VALUE rewrites one line of pins.env, keeping the comments and order.
set_pin() {
  if grep -q "^$1=" pins.env; then
    sed -i "s|^$1=.*|$1=$2|" pins.env
  else
    echo "$1=$2" >> pins.env
  fi
}

if want go; then
  series=${GO_SERIES:-$(echo "$GO_VERSION" | cut -d. -f1,2)}
  # The Go module proxy lists every toolchain release as golang.org/toolchain versions.
  latest=$(go list -m -versions golang.org/toolchain | tr ' ' '\n' |
    sed -n "s/^v0\.0\.1-go\(${series//./\\.}\.[0-9]*\)\.linux-amd64\$/\1/p" | sort -V | tail -1)
  if [ -z "$latest" ]; then
    echo "update: no Go $series release found on the module proxy" >&2; exit 1
  fi
  if [ "$latest" != "$GO_VERSION" ]; then
    echo "update: Go $GO_VERSION -> $latest"
  else
    echo "update: Go $GO_VERSION is the newest $series release"
  fi
  set_pin GO_VERSION "$latest"
  go mod edit -toolchain="go$latest"
  GO_VERSION=$latest
fi

if want modules; then
  before=$(mktemp)
  trap 'rm -f "$before"' EXIT
  cp go.mod "$before"
  # GOTOOLCHAIN: run with the pinned toolchain, so the go line never moves past it.
  export GOTOOLCHAIN="go$GO_VERSION+auto"
  go get -u -t ./...
  go mod tidy
  go build ./...
  if diff -u "$before" go.mod; then echo "update: modules already current"; fi
fi

if want kernel; then
  series_pkg=$KERNEL_DEB_PACKAGE
  if [ "$apt" = 1 ]; then
    if [ "$(id -u)" != 0 ]; then echo "update: --apt needs root" >&2; exit 1; fi
    apt-get update -qq
    # The newest linux-source-X.Y the archive offers, else the pinned one.
    newest=$(apt-cache search --names-only '^linux-source-[0-9]+\.[0-9]+$' | awk '{print $1}' | sort -V | tail -1)
    series_pkg=${newest:-$KERNEL_DEB_PACKAGE}
    apt-get install -y -qq --no-install-recommends "$series_pkg" >/dev/null
  fi
  # Prefer the newest installed linux-source-X.Y.
  installed=$(dpkg-query -W -f '${Status} ${Package}\n' 'linux-source-*' 2>/dev/null |
    awk '$3 == "installed" && $4 ~ /^linux-source-[0-9]+\.[0-9]+$/ {print $4}' | sort -V | tail -1)
  pkg=${installed:-$series_pkg}
  if ! dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    echo "update: $pkg is not installed (apt-get install $pkg, or run with --apt)" >&2; exit 1
  fi
  version=$(dpkg-query -W -f '${Version}' "$pkg")
  tarball=$(dpkg-query -L "$pkg" | grep -E '^/usr/src/linux-source-[0-9.]+\.tar\.(xz|bz2|gz)$' | head -1)
  [ -n "$tarball" ] && [ -f "$tarball" ] || { echo "update: $pkg ships no source tarball" >&2; exit 1; }
  sum=$(sha256sum "$tarball" | cut -d' ' -f1)
  if [ "$sum" != "$KERNEL_TARBALL_SHA256" ]; then
    echo "update: kernel source $KERNEL_DEB_PACKAGE $KERNEL_DEB_VERSION -> $pkg $version"
  else
    echo "update: kernel source $pkg $version unchanged"
  fi
  set_pin KERNEL_DEB_PACKAGE "$pkg"
  set_pin KERNEL_DEB_VERSION "$version"
  set_pin KERNEL_TARBALL "$tarball"
  set_pin KERNEL_TARBALL_SHA256 "$sum"
fi

echo "update: pins.env now:"
grep -v '^#' pins.env | sed 's/^/  /'
