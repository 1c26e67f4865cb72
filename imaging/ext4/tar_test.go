package ext4_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

// entry is one tar entry of a test archive and what the image must show for it.
type entry struct {
	hdr  tar.Header
	data []byte
}

func mkTar(t testing.TB, ents []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := e.hdr
		if h.Typeflag == tar.TypeReg || h.Typeflag == 0 {
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %q: %v", h.Name, err)
		}
		if len(e.data) > 0 {
			if _, err := tw.Write(e.data); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func writeTar(t testing.TB, tarball []byte, opts ext4.Options) (string, ext4.Result) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "out.ext4")
	res, err := ext4.WriteTar(context.Background(), bytes.NewReader(tarball), img, opts)
	if err != nil {
		t.Fatalf("WriteTar: %v", err)
	}
	ext4test.Fsck(t, img)
	return img, res
}

// vfsACL encodes a POSIX ACL as getxattr returns it.
func vfsACL(entries ...[3]uint32) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint16(b, uint16(e[0]))
		b = binary.LittleEndian.AppendUint16(b, uint16(e[1]))
		b = binary.LittleEndian.AppendUint32(b, e[2])
	}
	return b
}

func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

var t0 = time.Date(2024, 5, 17, 10, 11, 12, 123456789, time.UTC)

func TestEveryEntryType(t *testing.T) {
	cap := []byte{0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0} // cap_net_bind_service
	acl := vfsACL([3]uint32{1, 7, 0xffffffff}, [3]uint32{2, 6, 1000}, [3]uint32{4, 5, 0xffffffff}, [3]uint32{8, 4, 50}, [3]uint32{0x10, 7, 0xffffffff}, [3]uint32{0x20, 1, 0xffffffff})
	bigXattr := strings.Repeat("x", 1500)
	long := strings.Repeat("d", 200) + "/" + strings.Repeat("f", 250)
	sparse := make([]byte, 3<<20)
	copy(sparse[1<<20:], randBytes(1, 8192))
	copy(sparse[3<<20-100:], "tail")
	ents := []entry{
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o755, ModTime: t0}},
		// A hard link before its target.
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "early-link", Linkname: "bin/target", ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "bin", Mode: 0o755, Uid: 0, Gid: 0, ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "bin/target", Mode: 0o4755, Uid: 0, Gid: 0, ModTime: t0,
			PAXRecords: map[string]string{"SCHILY.xattr.security.capability": string(cap)}}, data: []byte("#!/bin/sh\necho target\n")},
		// A hard link after its target.
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "bin/late-link", Linkname: "/bin/target", ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "empty", Mode: 0o600, Uid: 70000, Gid: 80000, ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "multi", Mode: 0o2644, ModTime: t0, Format: tar.FormatPAX,
			AccessTime: t0.Add(time.Hour), ChangeTime: t0.Add(2 * time.Hour)}, data: randBytes(2, 300000)},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "sparse", Mode: 0o644, ModTime: t0}, data: sparse},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "tmp", Mode: 0o1777, ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "short", Linkname: "bin/target", ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "edge59", Linkname: strings.Repeat("a", 59), ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "edge60", Linkname: strings.Repeat("b", 60), ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "longlink", Linkname: strings.Repeat("c/", 1500), ModTime: t0, Format: tar.FormatPAX}},
		{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeBlock, Name: "dev/big", Mode: 0o660, Gid: 6, Devmajor: 259, Devminor: 70000, ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "dev/fifo", Mode: 0o620, ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: long, Mode: 0o644, ModTime: t0, Format: tar.FormatPAX}, data: []byte("pax long name")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "gnu/" + strings.Repeat("g", 150), Mode: 0o644, ModTime: t0.Truncate(time.Second), Format: tar.FormatGNU}, data: []byte("gnu long name")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "xattrs", Mode: 0o644, ModTime: t0, PAXRecords: map[string]string{
			"SCHILY.xattr.user.small":               "v",
			"SCHILY.xattr.trusted.overlay.opaque":   "y",
			"SCHILY.xattr.system.posix_acl_access":  string(acl),
			"SCHILY.xattr.user.big":                 bigXattr,
			"SCHILY.xattr.system.posix_acl_default": string(acl),
		}}, data: []byte("x")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "xattrs-same", Mode: 0o644, ModTime: t0, PAXRecords: map[string]string{
			"SCHILY.xattr.user.small":               "v",
			"SCHILY.xattr.trusted.overlay.opaque":   "y",
			"SCHILY.xattr.system.posix_acl_access":  string(acl),
			"SCHILY.xattr.user.big":                 bigXattr,
			"SCHILY.xattr.system.posix_acl_default": string(acl),
		}}},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "acl-dir", Mode: 0o750, ModTime: t0, PAXRecords: map[string]string{
			"SCHILY.xattr.system.posix_acl_default": string(vfsACL([3]uint32{1, 7, 0xffffffff}, [3]uint32{4, 5, 0xffffffff}, [3]uint32{0x20, 0, 0xffffffff})),
		}}},
		// Duplicates: the later entry wins; a directory over a directory keeps its children.
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "dup", Mode: 0o644, ModTime: t0}, data: randBytes(3, 50000)},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "dup", Mode: 0o640, ModTime: t0}, data: []byte("second")},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "bin/", Mode: 0o711, ModTime: t0}},
		// Names that try to escape the root land inside it.
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "../../escape", Mode: 0o644, ModTime: t0}, data: []byte("caught")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "/abs/file", Mode: 0o644, ModTime: t0}, data: []byte("absolute")},
		// Implicit parent directory.
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "implicit/deep/file", Mode: 0o644, ModTime: t0}, data: []byte("deep")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "old", Mode: 0o644, ModTime: time.Date(1901, 12, 14, 0, 0, 0, 0, time.UTC)}, data: []byte("old")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "future", Mode: 0o644, ModTime: time.Date(2200, 1, 2, 3, 4, 5, 6, time.UTC), Format: tar.FormatPAX}, data: []byte("2200")},
	}
	img, res := writeTar(t, mkTar(t, ents), ext4.Options{Label: "rootfs"})
	if res.UUID == "" || res.Size <= 0 {
		t.Fatalf("result %+v", res)
	}
	paths := []string{"/bin/target", "/early-link", "/bin/late-link", "/empty", "/multi", "/sparse", "/tmp",
		"/short", "/edge59", "/edge60", "/longlink", "/dev/null", "/dev/big", "/dev/fifo", "/" + long,
		"/gnu/" + strings.Repeat("g", 150), "/xattrs", "/dup", "/bin", "/escape", "/abs/file", "/implicit/deep/file",
		"/old", "/future", "/xattrs-same"}
	st := ext4test.Stat(t, img, paths...)
	get := map[string]*ext4test.Inode{}
	for i, p := range paths {
		if st[i] == nil {
			t.Fatalf("%s missing from the image", p)
		}
		get[p] = st[i]
	}
	check := func(p, typ string, mode, uid, gid uint32, size uint64, links uint32) {
		t.Helper()
		in := get[p]
		if in.Type != typ || in.Mode != mode || in.UID != uid || in.GID != gid || in.Size != size || in.Links != links {
			t.Errorf("%s: got type %q mode %o uid %d gid %d size %d links %d; want %q %o %d %d %d %d",
				p, in.Type, in.Mode, in.UID, in.GID, in.Size, in.Links, typ, mode, uid, gid, size, links)
		}
	}
	check("/bin/target", "regular", 0o4755, 0, 0, 22, 3)
	if get["/early-link"].Ino != get["/bin/target"].Ino || get["/bin/late-link"].Ino != get["/bin/target"].Ino {
		t.Errorf("hard links do not share the inode: %d %d %d", get["/early-link"].Ino, get["/bin/late-link"].Ino, get["/bin/target"].Ino)
	}
	check("/empty", "regular", 0o600, 70000, 80000, 0, 1)
	check("/multi", "regular", 0o2644, 0, 0, 300000, 1)
	check("/sparse", "regular", 0o644, 0, 0, 3<<20, 1)
	if bc := get["/sparse"].Blockcount; bc != 3*8 { // two data blocks + the tail block
		t.Errorf("/sparse: blockcount %d, want 24 (holes kept)", bc)
	}
	check("/tmp", "directory", 0o1777, 0, 0, 4096, 2)
	check("/short", "symlink", 0o777, 0, 0, 10, 1)
	check("/edge59", "symlink", 0o777, 0, 0, 59, 1)
	check("/edge60", "symlink", 0o777, 0, 0, 60, 1)
	check("/longlink", "symlink", 0o777, 0, 0, 3000, 1)
	check("/dev/null", "character special", 0o666, 0, 0, 0, 1)
	check("/dev/big", "block special", 0o660, 0, 6, 0, 1)
	check("/dev/fifo", "FIFO", 0o620, 0, 0, 0, 1)
	check("/dup", "regular", 0o640, 0, 0, 6, 1)
	check("/bin", "directory", 0o711, 0, 0, 4096, 2)
	if d := get["/dev/null"].Device; d != [2]uint32{1, 3} {
		t.Errorf("/dev/null device %v", d)
	}
	if d := get["/dev/big"].Device; d != [2]uint32{259, 70000} {
		t.Errorf("/dev/big device %v", d)
	}
	if got := get["/short"].FastLinkDest; got != "bin/target" {
		t.Errorf("/short target %q", got)
	}
	if m := get["/multi"]; m.Mtime != (ext4test.Time{Sec: t0.Unix(), Nsec: 123456789}) ||
		m.Atime != (ext4test.Time{Sec: t0.Unix() + 3600, Nsec: 123456789}) ||
		m.Ctime != (ext4test.Time{Sec: t0.Unix() + 7200, Nsec: 123456789}) {
		t.Errorf("/multi times: a %+v m %+v c %+v", m.Atime, m.Mtime, m.Ctime)
	}
	if m := get["/old"].Mtime; m.Sec != time.Date(1901, 12, 14, 0, 0, 0, 0, time.UTC).Unix() {
		t.Errorf("/old mtime %+v", m)
	}
	if m := get["/future"].Mtime; m != (ext4test.Time{Sec: time.Date(2200, 1, 2, 3, 4, 5, 6, time.UTC).Unix(), Nsec: 6}) {
		t.Errorf("/future mtime %+v", m)
	}
	for _, p := range []string{"/xattrs", "/xattrs-same"} {
		if get[p].FileACL == 0 {
			t.Errorf("%s: large xattrs not in a block", p)
		}
	}
	if get["/xattrs"].FileACL != get["/xattrs-same"].FileACL {
		t.Errorf("identical xattr sets do not share a block")
	}
	contents := map[string][]byte{
		"/bin/target": []byte("#!/bin/sh\necho target\n"), "/early-link": []byte("#!/bin/sh\necho target\n"),
		"/multi": ents[6].data, "/sparse": sparse, "/" + long: []byte("pax long name"),
		"/gnu/" + strings.Repeat("g", 150): []byte("gnu long name"), "/dup": []byte("second"),
		"/escape": []byte("caught"), "/abs/file": []byte("absolute"), "/implicit/deep/file": []byte("deep"),
		"/empty": nil,
	}
	for p, want := range contents {
		if got := ext4test.Cat(t, img, p); !bytes.Equal(got, want) {
			t.Errorf("%s: content differs (%d bytes, want %d)", p, len(got), len(want))
		}
	}
	ln := ext4test.Debugfs(t, img, "stat /longlink")
	_ = ln
	// e2fsprogs gives ACLs back with id 0, not ACL_UNDEFINED_ID, for the entries without an id.
	aclBack := vfsACL([3]uint32{1, 7, 0}, [3]uint32{2, 6, 1000}, [3]uint32{4, 5, 0}, [3]uint32{8, 4, 50}, [3]uint32{0x10, 7, 0}, [3]uint32{0x20, 1, 0})
	xw := map[string][]byte{
		"user.small": []byte("v"), "trusted.overlay.opaque": []byte("y"), "user.big": []byte(bigXattr),
		"system.posix_acl_access": aclBack, "system.posix_acl_default": aclBack,
	}
	for name, want := range xw {
		if got := ext4test.Xattr(t, img, "/xattrs", name); !bytes.Equal(got, want) {
			t.Errorf("/xattrs %s = %q, want %q", name, got, want)
		}
	}
	if got := ext4test.Xattr(t, img, "/bin/target", "security.capability"); !bytes.Equal(got, cap) {
		t.Errorf("security.capability = %x", got)
	}
	if got := ext4test.Xattr(t, img, "/acl-dir", "system.posix_acl_default"); !bytes.Equal(got, vfsACL([3]uint32{1, 7, 0}, [3]uint32{4, 5, 0}, [3]uint32{0x20, 0, 0})) {
		t.Errorf("in-inode default ACL = %x", got)
	}
	if st := ext4test.Stat(t, img, "/acl-dir")[0]; st.FileACL != 0 || len(st.Xattrs) != 1 {
		t.Errorf("small ACL not kept in the inode: file ACL block %d, xattrs %v", st.FileACL, st.Xattrs)
	}
	if get["/bin/target"].FileACL != 0 {
		t.Errorf("security.capability not kept in the inode")
	}
	if n := len(get["/bin/target"].Xattrs); n != 1 {
		t.Errorf("/bin/target xattrs %v", get["/bin/target"].Xattrs)
	}
	// Nothing escaped: the root holds exactly these names.
	ls := ext4test.Debugfs(t, img, "ls -p /")
	for _, name := range strings.Split(strings.TrimSpace(ls), "\n") {
		f := strings.Split(name, "/")
		if len(f) > 5 && f[5] == ".." && f[1] != "2" {
			t.Errorf("root's .. is not itself: %s", name)
		}
	}
	if strings.Contains(ls, "/abs/") == false && !strings.Contains(ls, "abs") {
		t.Errorf("root listing lacks abs: %s", ls)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(img), "escape")); err == nil {
		t.Errorf("escape left the image")
	}
}

// TestSymlinkedParents: entries below a symlink land where the symlink points inside the image,
// as with a chrooted extractor; nothing replaces the symlink and nothing leaves the root.
func TestSymlinkedParents(t *testing.T) {
	ents := []entry{
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "usr/lib/", Mode: 0o755, ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "lib", Linkname: "usr/lib", ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "lib/x", Mode: 0o644, ModTime: t0}, data: []byte("x")},
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "lib/hl", Linkname: "lib/x", ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "etc", Linkname: "/host/etc", ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "etc/passwd", Mode: 0o644, ModTime: t0}, data: []byte("root")},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "usr/up", Linkname: "../../..", ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "usr/up/z", Mode: 0o644, ModTime: t0}, data: []byte("z")},
	}
	img, _ := writeTar(t, mkTar(t, ents), ext4.Options{})
	st := ext4test.Stat(t, img, "/lib", "/usr/lib/x", "/usr/lib/hl", "/host/etc/passwd", "/z", "/etc")
	for i, p := range []string{"/lib", "/usr/lib/x", "/usr/lib/hl", "/host/etc/passwd", "/z", "/etc"} {
		if st[i] == nil {
			t.Fatalf("%s missing", p)
		}
	}
	if st[0].Type != "symlink" || st[5].Type != "symlink" {
		t.Errorf("symlinks replaced: /lib %s, /etc %s", st[0].Type, st[5].Type)
	}
	if st[1].Ino != st[2].Ino || st[1].Links != 2 {
		t.Errorf("hard link through a symlinked parent: %d %d links %d", st[1].Ino, st[2].Ino, st[1].Links)
	}
	loop := mkTar(t, []entry{
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "a", Linkname: "b"}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "b", Linkname: "a"}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "a/x"}},
	})
	dir := t.TempDir()
	if _, err := ext4.WriteTar(context.Background(), bytes.NewReader(loop), filepath.Join(dir, "o.ext4"), ext4.Options{}); err == nil || !strings.Contains(err.Error(), "symbolic links") {
		t.Fatalf("symlink loop: %v", err)
	}
	assertNoOutput(t, dir)
}

// TestFragmentedFile: every other block a hole gives 3000 extents, an extent tree two index
// levels deep.
func TestFragmentedFile(t *testing.T) {
	const n = 3000
	data := make([]byte, 2*n*4096)
	for i := 0; i < n; i++ {
		copy(data[2*i*4096:], randBytes(uint64(i), 64))
	}
	img, _ := writeTar(t, mkTar(t, []entry{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "frag", Mode: 0o644, ModTime: t0}, data: data}}), ext4.Options{})
	if got := ext4test.Cat(t, img, "/frag"); !bytes.Equal(got, data) {
		t.Fatalf("content differs")
	}
	if ext := ext4test.Extents(t, img, "/frag"); len(ext) != n {
		t.Fatalf("%d extents, want %d", len(ext), n)
	}
	tree := ext4test.Debugfs(t, img, "dump_extents /frag")
	if !strings.Contains(tree, " 2/ 2") {
		t.Fatalf("extent tree is not two levels deep:\n%.500s", tree)
	}
}
