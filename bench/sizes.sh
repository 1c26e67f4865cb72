#!/usr/bin/env bash
# bench/sizes.sh — sizes of the release binaries (as ./build.sh makes them) against the targets:
# virtkit-agent must stay under 4 MiB (it is copied into every guest); virtkit is reported.
# Also the gzip size (what an initramfs carries). Set NO_BUILD=1 to measure dist/ as it is.
# Exit status 1 when the agent is over its target.
set -euo pipefail
cd "$(dirname "$0")/.."
dist=${DIST:-dist}
[ "${NO_BUILD:-0}" = 1 ] || ./build.sh >/dev/null
agent_target=$((4 * 1024 * 1024))
status=0
printf '%-15s %12s %10s %12s  %s\n' binary bytes MiB gzip-MiB target
for b in virtkit virtkit-agent; do
  f="$dist/$b"
  [ -f "$f" ] || { echo "sizes: $f missing (run ./build.sh)" >&2; exit 2; }
  size=$(stat -c %s "$f")
  gz=$(gzip -9 -c "$f" | wc -c)
  verdict="-"
  if [ "$b" = virtkit-agent ]; then
    pct=$(awk -v s="$size" -v t="$agent_target" 'BEGIN { printf "%.1f", 100 * s / t }')
    if [ "$size" -le "$agent_target" ]; then
      verdict="4 MiB: ok, ${pct}% of target, $(( (agent_target - size) / 1024 )) KiB to spare"
    else
      verdict="4 MiB: OVER by $(( (size - agent_target) / 1024 )) KiB (${pct}%)"
      status=1
    fi
  fi
  awk -v b="$b" -v s="$size" -v g="$gz" -v v="$verdict" 'BEGIN { printf "%-15s %12d %10.2f %12.2f  %s\n", b, s, s/1048576, g/1048576, v }'
done
exit $status
