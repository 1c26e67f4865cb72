#!/bin/sh
# Compare virtkit's switch with gvproxy, slirp4netns and pasta side by side (iperf3, TCP, 1 and 4
# streams, guest→host and host→guest, MTU 1500 and 65520) and print throughput and CPU ratios.
#
#   sudo ./bench/switch/run.sh   # VK_BENCH_SECONDS=5 per iperf3 run, VK_BENCH_ROUNDS=3 sweeps (medians)
#
# Needs root, iperf3, slirp4netns, passt (pasta) and gvproxy v0.8.9 (installed here if missing).
set -eu
cd "$(dirname "$0")/../.."
: "${VK_BENCH_SECONDS:=5}"
: "${VK_BENCH_ROUNDS:=3}"
export VK_BENCH_SECONDS
if ! command -v gvproxy >/dev/null 2>&1 && [ ! -x "${HOME}/go/bin/gvproxy" ]; then
	go install github.com/containers/gvisor-tap-vsock/cmd/gvproxy@v0.8.9
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
go test -run '^$' -bench BenchmarkIperf -benchtime 1x -count "$VK_BENCH_ROUNDS" -timeout 120m ./bench/switch/ | tee "$out"
python3 - "$out" <<'PY'
import re, statistics, sys
samples = {}
for line in open(sys.argv[1]):
    m = re.match(r'BenchmarkIperf/mtu=(\d+)/dir=(\w+)/streams=(\d+)/net=(\S+?)-\d+\s+\d+\s+\d+ ns/op\s+([\d.]+) Gbit/s\s+([\d.]+) cpu-s/GB', line)
    if m:
        mtu, d, s, net, g, c = m.groups()
        samples.setdefault((int(mtu), d, int(s), net), []).append((float(g), float(c)))
rows = {k: (statistics.median(g for g, _ in v), statistics.median(c for _, c in v)) for k, v in samples.items()}
print("\nmedians of %d rounds" % max(len(v) for v in samples.values()))
nets = ["virtkit", "virtkit-nooffload", "gvproxy", "slirp4netns", "pasta"]
peers = ["gvproxy", "slirp4netns", "pasta"]
print()
print("%-6s %-4s %-3s | %s | %s" % ("mtu", "dir", "P", " ".join("%13s" % n[:13] for n in nets),
      " ".join("%10s" % ("vk/" + n[:6]) for n in peers)))
keys = sorted({k[:3] for k in rows})
for k in keys:
    vals = [rows.get(k + (n,)) for n in nets]
    vk = vals[0]
    cells = " ".join("%13s" % ("%.2fG %.1fc" % v if v else "-") for v in vals)
    ratios = " ".join("%10s" % ("%.2fx" % (vk[0] / v[0]) if vk and v and v[0] else "-") for v in (rows.get(k + (n,)) for n in peers))
    print("%-6d %-4s %-3d | %s | %s" % (k[0], k[1], k[2], cells, ratios))
print("\nG = Gbit/s received; c = CPU seconds per GB in the backend's processes (virtkit and gvproxy include the guest relay).")
print("vk/X = virtkit throughput / X throughput. virtkit-nooffload: the same without TCP segmentation offload")
print("(switch --no-offload, relay --no-offload): frames never exceed the MTU.")
PY
