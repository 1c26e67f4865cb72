#!/usr/bin/env bash
# install-deps.sh — install the Debian packages of deploy/debian-packages.txt that are missing,
# and the Go test runner (gotestsum) into $(go env GOPATH)/bin. Idempotent; quiet when nothing to do.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t want < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/debian-packages.txt" | grep .)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
gobin=$(go env GOPATH)/bin
[ -x "$gobin/gotestsum" ] || GOFLAGS= go install gotest.tools/gotestsum@v1.13.0
