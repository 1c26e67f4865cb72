// Package ext4test checks ext4 images with the real e2fsprogs tools and provides cached root
// filesystem fixtures, for the tests of imaging/ext4 and of the packages that build on it.
//
// Helpers fail the test (skip only under -short) when a tool is missing; they are safe for use
// from parallel tests.
package ext4test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/internal/flock"
)

// Fsck runs `e2fsck -fn` and fails the test on any complaint.
func Fsck(t testing.TB, img string) {
	t.Helper()
	out, err := exec.Command(cmdtest.Tool(t, "e2fsck"), "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img, err, out)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if strings.HasPrefix(l, "Pass ") || strings.HasPrefix(l, "e2fsck ") || strings.Contains(l, " files (") {
			continue
		}
		t.Fatalf("e2fsck -fn %s complained: %q\n%s", img, l, out)
	}
}

// Debugfs runs debugfs commands (read-only) against img and returns their standard output.
func Debugfs(t testing.TB, img string, cmds ...string) string {
	t.Helper()
	f, err := os.CreateTemp("", "debugfs-cmds-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	fmt.Fprintln(f, strings.Join(cmds, "\n"))
	f.Close()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(cmdtest.Tool(t, "debugfs"), "-f", f.Name(), img)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("debugfs %s: %v\n%s", img, err, stderr.Bytes())
	}
	return stdout.String()
}

// Time is an inode timestamp as debugfs shows it.
type Time struct {
	Sec  int64
	Nsec uint32
}

// Inode is what debugfs `stat` reports about one inode.
type Inode struct {
	Ino          uint64
	Type         string // "regular", "directory", "symlink", "character special", ...
	Mode         uint32 // permission and special bits
	Flags        uint32
	UID, GID     uint32
	Size         uint64
	Links        uint32
	Blockcount   uint64
	FileACL      uint64
	Atime, Mtime Time
	Ctime        Time
	Device       [2]uint32 // major, minor
	Xattrs       []string  // attribute names
	FastLinkDest string
}

// Stat returns debugfs's view of each path (nil for a path it cannot find).
func Stat(t testing.TB, img string, paths ...string) []*Inode {
	t.Helper()
	var cmds []string
	for _, p := range paths {
		cmds = append(cmds, "stat "+quote(p))
	}
	out := Debugfs(t, img, cmds...)
	res := make([]*Inode, len(paths))
	sections := strings.Split("\n"+out, "\ndebugfs: stat ")[1:]
	if len(sections) != len(paths) {
		t.Fatalf("debugfs stat: %d sections for %d paths", len(sections), len(paths))
	}
	for i, s := range sections {
		res[i] = parseStat(t, s)
	}
	return res
}

func quote(p string) string {
	if strings.ContainsAny(p, " \t\"") {
		return `"` + strings.ReplaceAll(p, `"`, `\"`) + `"`
	}
	return p
}

func parseStat(t testing.TB, s string) *Inode {
	in := &Inode{}
	found := false
	sc := bufio.NewScanner(strings.NewReader(s))
	inXattrs := false
	for sc.Scan() {
		l := sc.Text()
		f := strings.Fields(l)
		if inXattrs {
			if strings.HasPrefix(l, "  ") && len(f) > 0 {
				in.Xattrs = append(in.Xattrs, f[0])
				continue
			}
			inXattrs = false
		}
		switch {
		case strings.HasPrefix(l, "Inode:"):
			found = true
			in.Ino = atou(f[1])
			rest := strings.SplitN(l, "Type: ", 2)[1]
			in.Type = strings.TrimSpace(strings.SplitN(rest, "Mode:", 2)[0])
			for i := range f {
				switch f[i] {
				case "Mode:":
					v, _ := strconv.ParseUint(f[i+1], 8, 32)
					in.Mode = uint32(v)
				case "Flags:":
					v, _ := strconv.ParseUint(f[i+1], 0, 32)
					in.Flags = uint32(v)
				}
			}
		case strings.HasPrefix(l, "User:"):
			in.UID, in.GID = uint32(atou(f[1])), uint32(atou(f[3]))
			for i := range f {
				if f[i] == "Size:" {
					in.Size = atou(f[i+1])
				}
			}
		case strings.HasPrefix(l, "File ACL:"):
			in.FileACL = atou(f[2])
		case strings.HasPrefix(l, "Links:"):
			in.Links = uint32(atou(f[1]))
			in.Blockcount = atou(f[3])
		case strings.HasPrefix(strings.TrimSpace(l), "atime:"):
			in.Atime = parseTime(f[1])
		case strings.HasPrefix(strings.TrimSpace(l), "mtime:"):
			in.Mtime = parseTime(f[1])
		case strings.HasPrefix(strings.TrimSpace(l), "ctime:"):
			in.Ctime = parseTime(f[1])
		case strings.Contains(l, "Device major/minor number:"):
			// "Device major/minor number: 01:03 (hex 01:03)", "(New-style) Device ..."
			i := 0
			for f[i] != "number:" {
				i++
			}
			mm := strings.Split(f[i+1], ":")
			in.Device = [2]uint32{uint32(atou(mm[0])), uint32(atou(mm[1]))}
		case strings.HasPrefix(l, "Fast link dest:"):
			d := strings.TrimPrefix(l, "Fast link dest: ")
			in.FastLinkDest = strings.TrimSuffix(strings.TrimPrefix(d, `"`), `"`)
		case strings.HasPrefix(l, "Extended attributes:"):
			inXattrs = true
		}
	}
	if !found {
		return nil
	}
	return in
}

func atou(s string) uint64 {
	v, _ := strconv.ParseUint(strings.TrimRight(s, ","), 10, 64)
	return v
}

// parseTime reads "0xSSSSSSSS:EEEEEEEE" (seconds, extra: nsec<<2 | epoch).
func parseTime(s string) Time {
	parts := strings.Split(strings.TrimPrefix(s, "0x"), ":")
	lo, _ := strconv.ParseUint(parts[0], 16, 32)
	var extra uint64
	if len(parts) > 1 {
		extra, _ = strconv.ParseUint(parts[1], 16, 32)
	}
	sec := int64(int32(uint32(lo))) + int64(extra&3)<<32
	return Time{Sec: sec, Nsec: uint32(extra >> 2)}
}

// Xattr reads one extended attribute's value (POSIX ACLs come back in the VFS encoding).
func Xattr(t testing.TB, img, path, name string) []byte {
	t.Helper()
	f, err := os.CreateTemp("", "ea-")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	defer os.Remove(f.Name())
	Debugfs(t, img, fmt.Sprintf("ea_get -f %s %s %s", f.Name(), quote(path), name))
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Cat returns a file's content read back by debugfs.
func Cat(t testing.TB, img, path string) []byte {
	t.Helper()
	f, err := os.CreateTemp("", "cat-")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	defer os.Remove(f.Name())
	Debugfs(t, img, fmt.Sprintf("dump %s %s", quote(path), f.Name()))
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Rdump extracts the whole image into a new temporary folder with debugfs and returns it.
func Rdump(t testing.TB, img string) string {
	t.Helper()
	dir := t.TempDir()
	out := Debugfs(t, img, "rdump / "+dir)
	_ = out
	return dir
}

// Dumpe2fs returns `dumpe2fs -h` output.
func Dumpe2fs(t testing.TB, img string) string {
	t.Helper()
	out, err := exec.Command(cmdtest.Tool(t, "dumpe2fs"), "-h", img).Output()
	if err != nil {
		t.Fatalf("dumpe2fs %s: %v", img, err)
	}
	return string(out)
}

// FixtureDir is where large test fixtures are cached, outside the repository.
func FixtureDir(t testing.TB) string {
	t.Helper()
	d := os.Getenv("VIRTKIT_FIXTURES")
	if d == "" {
		home, err := os.UserCacheDir()
		if err != nil {
			t.Fatal(err)
		}
		d = filepath.Join(home, "virtkit", "fixtures")
	}
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// lock serialises fixture builds across test processes.
func lock(t testing.TB, name string) func() {
	t.Helper()
	unlock, err := flock.Lock(context.Background(), filepath.Join(FixtureDir(t), "."+name+".lock"))
	if err != nil {
		t.Fatal(err)
	}
	return unlock
}

// DebianTar returns a tar of a minimal Debian bookworm (debootstrap --variant=minbase) made by
// deploy/debian-rootfs.sh, the one builder of this fixture (quickstart and the benches use it
// too), cached in FixtureDir. It needs root and network access to a Debian mirror the first time,
// and a minute or a few then.
func DebianTar(t testing.TB) string {
	t.Helper()
	dir := FixtureDir(t)
	out := filepath.Join(dir, "debian-bookworm-minbase.tar")
	if _, err := os.Stat(out); err == nil {
		return out
	}
	cmdtest.RequireRoot(t)
	cmdtest.Tool(t, "debootstrap")
	t.Logf("ext4test: deploy/debian-rootfs.sh (once, cached in %s)", dir)
	cmd := exec.Command(filepath.Join(cmdtest.Root(t), "deploy", "debian-rootfs.sh"))
	cmd.Env = append(os.Environ(), "VIRTKIT_FIXTURES="+dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		t.Fatalf("ext4test: deploy/debian-rootfs.sh: %v\n%s", err, stderr.Bytes())
	}
	if got := strings.TrimSpace(string(b)); got != out {
		t.Fatalf("ext4test: deploy/debian-rootfs.sh made %q, want %q", got, out)
	}
	return out
}

// Debootstrap returns the DebianTar root filesystem as a tree, extracted once (owners, modes and
// xattrs kept) and cached under FixtureDir. It needs root the first time. Treat the tree as
// read-only.
func Debootstrap(t testing.TB) string {
	t.Helper()
	cmdtest.Heavy(t)
	tarball := DebianTar(t)
	dir := filepath.Join(FixtureDir(t), "debian-bookworm-minbase")
	defer lock(t, "debian-tree")()
	if _, err := os.Stat(filepath.Join(dir, "usr", "bin", "dpkg")); err == nil {
		return dir
	}
	cmdtest.RequireRoot(t)
	tmp, err := os.MkdirTemp(FixtureDir(t), ".debian-tree-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	root := filepath.Join(tmp, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(cmdtest.Tool(t, "tar"), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tarball, "-C", root)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("extract %s: %v\n%s", tarball, err, out)
	}
	os.RemoveAll(dir)
	if err := os.Rename(root, dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Extent is one mapping of a file's logical blocks to image blocks.
type Extent struct{ Logical, Physical, Len uint64 }

// ExtentMap is a file's data mapping as debugfs reports it.
type ExtentMap []Extent

// Phys maps a logical block to its image block.
func (m ExtentMap) Phys(l uint64) (uint64, bool) {
	for _, e := range m {
		if l >= e.Logical && l < e.Logical+e.Len {
			return e.Physical + l - e.Logical, true
		}
	}
	return 0, false
}

// Extents returns the leaf extents of path from `debugfs dump_extents -l`.
func Extents(t testing.TB, img, path string) ExtentMap {
	t.Helper()
	out := Debugfs(t, img, "dump_extents -l "+quote(path))
	var m ExtentMap
	for _, l := range strings.Split(out, "\n") {
		// " 1/ 1   1/  3     0 -    4     9 -    13      5 "
		f := strings.Fields(strings.NewReplacer("/", " ", "-", " ").Replace(l))
		if len(f) < 9 {
			continue
		}
		lo, hi, p := atou(f[4]), atou(f[5]), atou(f[6])
		n := atou(f[8])
		if n == 0 || hi < lo {
			continue
		}
		m = append(m, Extent{Logical: lo, Physical: p, Len: n})
	}
	if len(m) == 0 {
		t.Fatalf("dump_extents %s: no extents in\n%s", path, out)
	}
	return m
}
