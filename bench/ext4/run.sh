#!/bin/bash
# Compare virtkit's ext4 writer with `mke2fs -d` (e2fsprogs) and Microsoft's tar2ext4 (hcsshim
# v0.15.0) side by side, and print wall time, input MB/s, peak RSS and ratios.
#
#   ./bench/ext4/run.sh                 # VK_BENCH_LARGE=5G VK_BENCH_REPS=3 VK_BENCH_CASES="large rootfs"
#
# Cases: (a) "large": a tar of five big files of non-zero data (VK_BENCH_LARGE in total);
# (b) "rootfs": four copies of a Debian bookworm minbase tree (~27,000 entries) as a tar.
# virtkit and tar2ext4 read the tar; mke2fs -d and `virtkit mkext` read the same tree unpacked.
# Every run writes to a fresh file on the same filesystem; the best of VK_BENCH_REPS is kept.
# Needs debootstrap (root) the first time for the rootfs fixture, e2fsprogs, GNU time and Go.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${VK_BENCH_LARGE:=5G}" "${VK_BENCH_REPS:=3}" "${VK_BENCH_DIR:=/var/tmp/virtkit-bench-ext4}" "${VK_BENCH_CASES:=large rootfs}"
fixtures="${VIRTKIT_FIXTURES:-${XDG_CACHE_HOME:-$HOME/.cache}/virtkit/fixtures}"
mkdir -p "$VK_BENCH_DIR/bin"
W="$VK_BENCH_DIR"

go build -trimpath -o "$W/bin/mkext" ./bench/ext4/mkext   # imaging/ext4 alone, as `virtkit mkext-tar` runs it
go build -trimpath -o "$W/bin/gentar" ./bench/ext4/gentar
if [ ! -x "$W/bin/tar2ext4" ]; then
	( mkdir -p "$W/t2e" && cd "$W/t2e" && { [ -f go.mod ] || go mod init x >/dev/null 2>&1; } &&
	  GOFLAGS=-mod=mod go get github.com/Microsoft/hcsshim@v0.15.0 >/dev/null 2>&1 &&
	  go build -o "$W/bin/tar2ext4" github.com/Microsoft/hcsshim/cmd/tar2ext4 )
fi

# Inputs.
if [ ! -f "$W/large-$VK_BENCH_LARGE.tar" ]; then
	"$W/bin/gentar" -kind large -size "$VK_BENCH_LARGE" -files 5 > "$W/large.tmp" && mv "$W/large.tmp" "$W/large-$VK_BENCH_LARGE.tar"
	rm -rf "$W/large-tree" 
fi
if [ ! -d "$W/large-tree-$VK_BENCH_LARGE" ]; then
	mkdir -p "$W/large-tree-$VK_BENCH_LARGE" && tar -C "$W/large-tree-$VK_BENCH_LARGE" -xf "$W/large-$VK_BENCH_LARGE.tar"
fi
deb="$fixtures/debian-bookworm-minbase"
if [ ! -x "$deb/usr/bin/dpkg" ]; then
	# Same fixture the tests use (imaging/ext4/ext4test.Debootstrap: deploy/debian-rootfs.sh, extracted).
	go test -count=1 -run 'TestDebianRootfs/tar' ./imaging/ext4/ >/dev/null
fi
if [ ! -f "$W/rootfs.tar" ]; then
	rm -rf "$W/rootfs-tree" && mkdir -p "$W/rootfs-tree"
	for i in 0 1 2 3; do cp -a "$deb" "$W/rootfs-tree/r$i"; done
	tar --format=posix --numeric-owner --xattrs --xattrs-include='*' --sort=name -C "$W/rootfs-tree" -cf "$W/rootfs.tmp" .
	mv "$W/rootfs.tmp" "$W/rootfs.tar"
fi

results="$W/results.txt"
: > "$results"
echo "load before: $(uptime)"
measure() { # case tool input-bytes command...
	local c=$1 tool=$2 bytes=$3; shift 3
	local best="" rss=""
	for _ in $(seq "$VK_BENCH_REPS"); do
		rm -f "$W/out.img"; sync
		/usr/bin/time -f "%e %M" -o "$W/time.txt" "$@" > /dev/null 2> "$W/err.txt" || { cat "$W/err.txt"; exit 1; }
		read -r wall kb < "$W/time.txt"
		if [ -z "$best" ] || awk "BEGIN{exit !($wall < $best)}"; then best=$wall; fi
		if [ -z "$rss" ] || [ "$kb" -gt "$rss" ]; then rss=$kb; fi
	done
	if [ "$tool" != tar2ext4 ]; then e2fsck -fn "$W/out.img" > /dev/null 2>&1 || { echo "$tool $c: e2fsck failed"; exit 1; }; fi
	echo "$c $tool $bytes $best $rss" | tee -a "$results"
	rm -f "$W/out.img"
}
size_of() { stat -c %s "$1"; }
for c in $VK_BENCH_CASES; do
	if [ $c = large ]; then in="$W/large-$VK_BENCH_LARGE.tar"; tree="$W/large-tree-$VK_BENCH_LARGE"; else in="$W/rootfs.tar"; tree="$W/rootfs-tree"; fi
	bytes=$(size_of "$in")
	"$W/bin/mkext" -tar "$in" -o "$W/probe.img" > /dev/null
	img=$(size_of "$W/probe.img"); rm -f "$W/probe.img"
	measure $c virtkit "$bytes" "$W/bin/mkext" -tar "$in" -o "$W/out.img"
	measure $c virtkit-nojournal "$bytes" "$W/bin/mkext" -no-journal -tar "$in" -o "$W/out.img"
	# --uuid: the UUID is given, so the input is not hashed (what the converter does).
	measure $c virtkit-uuid "$bytes" "$W/bin/mkext" -uuid 6b1f3c1e-2d4a-8e5f-9a0b-1c2d3e4f5a6b -tar "$in" -o "$W/out.img"
	measure $c tar2ext4 "$bytes" "$W/bin/tar2ext4" -i "$in" -o "$W/out.img"
	measure $c virtkit-dir "$bytes" "$W/bin/mkext" -dir "$tree" -o "$W/out.img"
	measure $c mke2fs-d "$bytes" mke2fs -q -F -t ext4 -d "$tree" "$W/out.img" "$((img / 1024))k"
done

python3 - "$results" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    c, tool, b, wall, kb = line.split()
    rows[(c, tool)] = (int(b), float(wall), int(kb))
tools = ["virtkit", "virtkit-nojournal", "virtkit-uuid", "tar2ext4", "virtkit-dir", "mke2fs-d"]
print()
print("%-7s %-18s %9s %9s %10s" % ("case", "tool", "wall s", "MB/s", "peak RSS"))
for c in ["large", "rootfs"]:
    for t in tools:
        if (c, t) in rows:
            b, w, kb = rows[(c, t)]
            print("%-7s %-18s %9.2f %9.0f %7.1f MiB" % (c, t, w, b / 1e6 / w, kb / 1024))
    v, d = rows.get((c, "virtkit")), rows.get((c, "virtkit-dir"))
    t2, mk = rows.get((c, "tar2ext4")), rows.get((c, "mke2fs-d"))
    if v and t2:
        print("  %s: virtkit mkext-tar is %.2fx tar2ext4's throughput (goal >= 2x)" % (c, t2[1] / v[1]))
    u = rows.get((c, "virtkit-uuid"))
    if u and t2:
        print("  %s: virtkit mkext-tar --uuid (no content hash) is %.2fx tar2ext4's throughput" % (c, t2[1] / u[1]))
    if d and mk:
        print("  %s: virtkit mkext DIR is %.2fx mke2fs -d (goal >= 3x)" % (c, mk[1] / d[1]))
    if v and mk:
        print("  %s: virtkit mkext-tar is %.2fx mke2fs -d on the unpacked tree" % (c, mk[1] / v[1]))
    if v:
        print("  %s: virtkit peak RSS %.1f MiB (goal < 64 MiB)" % (c, v[2] / 1024))
PY
echo "load after: $(uptime)"
