#!/bin/sh
# Compare `virtkit virtiofsd` with QEMU's C virtiofsd on the same share, side by side, and print
# the hybrid-vsock backend's numbers:
#   - FUSE ops/s through the Go vhost-user frontend harness (no VM): lookup, getattr, 4 KiB and
#     1 MiB reads and writes, one request at a time; 1 MiB ones also as a guest lays them out
#     (-pages: 256 page-sized descriptors apart in guest memory), and those at a TCG guest's pace
#     (5 ms apart: latency and daemon CPU per request, the daemon sleeping between requests);
#   - file work inside a TCG guest (1000 creates, 1000 stats after the 1 s cache expired, 32 MiB
#     write and cold read, unlink);
#   - vsock connection set-up and echo MB/s with a TCG guest.
# Rounds alternate between the daemons and the medians are compared, because this kind of machine
# is shared and noisy.
#
#   sudo ./bench/vhostuser/run.sh          # VK_BENCH_ROUNDS=5, VK_BENCH_OPS=3000 by default
set -eu
cd "$(dirname "$0")/../.."
: "${VK_BENCH_ROUNDS:=5}" "${VK_BENCH_OPS:=3000}" "${VK_BENCH_PACED_OPS:=500}" "${VK_BENCH_GUEST_ROUNDS:=5}"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
: >"$out"
# One round = each daemon once, back to back; -count would run all of one daemon's rounds first
# and let a slow minute on the host fall on one side only.
for i in $(seq "$VK_BENCH_ROUNDS"); do
	go test -run '^$' -bench 'BenchmarkFUSE$' -benchtime "${VK_BENCH_OPS}x" -timeout 60m ./bench/vhostuser/ | tee -a "$out"
	go test -run '^$' -bench 'BenchmarkFUSEPaced' -benchtime "${VK_BENCH_PACED_OPS}x" -timeout 60m ./bench/vhostuser/ | tee -a "$out"
done
for i in $(seq "$VK_BENCH_GUEST_ROUNDS"); do
	go test -run '^$' -bench 'BenchmarkGuestFS' -benchtime 1x -timeout 60m ./bench/vhostuser/ | tee -a "$out"
done
go test -run '^$' -bench 'BenchmarkVsockGuest' -benchtime 20x -count 3 -timeout 60m ./bench/vhostuser/ | tee -a "$out"
python3 - "$out" <<'PY'
import re, sys, statistics, random
fuse, fcpu, guest, vs, plat, pcpu = {}, {}, {}, {}, {}, {}
for line in open(sys.argv[1]):
    m = re.match(r'BenchmarkFUSEPaced/daemon=(\S+)/op=(\S+?)-\d+\s.*?([\d.]+) daemon-us/op\s+([\d.]+) p50-us', line)
    if m:
        pcpu.setdefault((m.group(2), m.group(1)), []).append(float(m.group(3)))
        plat.setdefault((m.group(2), m.group(1)), []).append(float(m.group(4)))
        continue
    m = re.match(r'BenchmarkFUSE/daemon=(\S+)/op=(\S+?)-\d+\s.*?([\d.]+) ops/s', line)
    if m:
        fuse.setdefault((m.group(2), m.group(1)), []).append(float(m.group(3)))
        c = re.search(r'([\d.]+) daemon-us/op', line)
        if c:
            fcpu.setdefault((m.group(2), m.group(1)), []).append(float(c.group(1)))
        continue
    m = re.match(r'BenchmarkGuestFS/daemon=(\S+?)-\d+\s+\d+\s+\d+ ns/op\s+(.*)', line)
    if m:
        for v, unit in re.findall(r'([\d.]+) (\S+)', m.group(2)):
            guest.setdefault((unit, m.group(1)), []).append(float(v))
        continue
    m = re.match(r'BenchmarkVsockGuest/(\S+?)-\d+\s+\d+\s+\d+ ns/op\s+(.*)', line)
    if m:
        for v, unit in re.findall(r'([\d.]+) (\S+)', m.group(2)):
            vs.setdefault((m.group(1), unit), []).append(float(v))
med = statistics.median
ops = ["lookup", "getattr", "read4k", "read1m", "read1m-pages", "write4k", "write1m", "write1m-pages"]

def table(title, first, data, keys, fmt, lower_better=False):
    """Prints virtkit against c-virtiofsd for each key with both, and the ratio (> 1: virtkit better)."""
    print("\n" + title)
    print("%-18s %12s %12s %8s" % (first, "virtkit", "c-virtiofsd", "ratio"))
    for k in keys:
        a, b = data.get((k, "virtkit")), data.get((k, "c-virtiofsd"))
        if a and b:
            r = med(b) / med(a) if lower_better else med(a) / med(b)
            print(("%-18s %12" + fmt + " %12" + fmt + " %7.2fx") % (k, med(a), med(b), r))

table("FUSE through the harness (median ops/s over rounds)", "op", fuse, ops, ".0f")
table("Daemon CPU per request through the harness (median µs; lower is better; steadier than ops/s here)",
      "op", fcpu, ops, ".1f", lower_better=True)
paced = ["write1m-pages", "read1m-pages"]
table("1 MiB requests 5 ms apart, as from a TCG guest: median latency (µs; lower is better)",
      "op", plat, paced, ".1f", lower_better=True)
table("1 MiB requests 5 ms apart: daemon CPU per request, the waits included (median µs; lower is better)",
      "op", pcpu, paced, ".1f", lower_better=True)
table("File work in a TCG guest (median)", "metric", guest, sorted({k[0] for k in guest}), ".1f")
# Rounds alternate the daemons, so round i of one faced the same minute of the host as round i of
# the other: the spread of those paired ratios shows how much a median hides, and resampling the
# pairs (bootstrap, fixed seed) gives a 95% interval for their median.
rng = random.Random(1)

def paired(title, data, keys, invert=False):
    print("\n" + title)
    print("%-18s %8s %8s %8s   %s" % ("", "min", "median", "max", "95% interval of the median"))
    for k in keys:
        a, b = data.get((k, "virtkit"), []), data.get((k, "c-virtiofsd"), [])
        rs = sorted((y / x if invert else x / y) for x, y in zip(a, b) if x and y)
        if not rs:
            continue
        boot = sorted(med(rng.choices(rs, k=len(rs))) for _ in range(2000))
        print("%-18s %7.2fx %7.2fx %7.2fx   %.2fx-%.2fx" % (k, rs[0], med(rs), rs[-1], boot[50], boot[1949]))

paired("FUSE through the harness, paired rounds (ops/s, virtkit / c-virtiofsd)", fuse, ops)
paired("File work in a TCG guest, paired rounds (virtkit / c-virtiofsd)", guest, sorted({k[0] for k in guest}))
print("\nhybrid vsock with a TCG guest (median; no peer backend exists on this host: no /dev/vhost-vsock, no Cloud Hypervisor)")
for (name, unit), v in sorted(vs.items()):
    if unit in ("MB/s", "us/connect"):
        print("%-8s %10.1f %s" % (name, med(v), unit))
print("\nratio = virtkit / c-virtiofsd (higher is better for virtkit, except daemon-cpu-ms: CPU the daemon used for the whole guest run);")
print("for daemon CPU per request the ratio is c-virtiofsd / virtkit (higher is better for virtkit).")
PY
