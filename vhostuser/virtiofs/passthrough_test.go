package virtiofs

import (
	"bytes"
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

const entryOutSize = int(unsafe.Sizeof(fuse.EntryOut{}))

func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }
func le64(b []byte) uint64                  { return binary.LittleEndian.Uint64(b) }
func le32(b []byte) uint32                  { return binary.LittleEndian.Uint32(b) }

// These tests call the pass-through file system's methods directly, as the protocol server does,
// to check what a guest kernel would see op by op; the virtqueue path is TestFUSEOps and the
// real-kernel path TestQEMUGuest.

func newTestFS(t *testing.T, share string) *passthrough {
	t.Helper()
	fs, err := newPassthrough(share, time.Second, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fs.close)
	return fs
}

func hdr(node uint64) fuse.InHeader { return fuse.InHeader{NodeId: node} }

func mustLookup(t *testing.T, fs *passthrough, dir uint64, name string) fuse.EntryOut {
	t.Helper()
	var out fuse.EntryOut
	h := hdr(dir)
	if st := fs.Lookup(nil, &h, name, &out); !st.Ok() {
		t.Fatalf("lookup %q: %v", name, st)
	}
	return out
}

func mustOpen(t *testing.T, fs *passthrough, node uint64, flags int) uint64 {
	t.Helper()
	var out fuse.OpenOut
	if st := fs.Open(nil, &fuse.OpenIn{InHeader: hdr(node), Flags: uint32(flags)}, &out); !st.Ok() {
		t.Fatalf("open %d: %v", node, st)
	}
	return out.Fh
}

func readAll(t *testing.T, fs *passthrough, fh uint64, size int) []byte {
	t.Helper()
	rr, st := fs.Read(nil, &fuse.ReadIn{Fh: fh, Size: uint32(size)}, nil)
	if !st.Ok() {
		t.Fatalf("read: %v", st)
	}
	defer rr.Done()
	buf := make([]byte, size)
	n, st := rr.(interface {
		Readv([][]byte) (int, fuse.Status)
	}).Readv([][]byte{buf[:size/2], buf[size/2:]})
	if !st.Ok() {
		t.Fatalf("readv: %v", st)
	}
	return buf[:n]
}

// TestLookupIdentity: a name looked up again, and a hard link to the same file, give the node ID
// the guest already has; FORGET drops the inode (and its descriptor) only when the count the
// kernel holds reaches zero.
func TestLookupIdentity(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("x"), 0o644)
	os.Link(filepath.Join(share, "f"), filepath.Join(share, "g"))
	fs := newTestFS(t, share)
	a := mustLookup(t, fs, rootID, "f")
	b := mustLookup(t, fs, rootID, "f")
	c := mustLookup(t, fs, rootID, "g")
	if a.NodeId != b.NodeId || a.NodeId != c.NodeId || a.NodeId == rootID {
		t.Fatalf("node ids %d %d %d", a.NodeId, b.NodeId, c.NodeId)
	}
	if a.Attr.Nlink != 2 || a.EntryValid != 1 {
		t.Fatalf("attr %+v", a)
	}
	if got := fs.fds.Load(); got != 2 { // root + f
		t.Fatalf("%d descriptors held, want 2", got)
	}
	fs.Forget(a.NodeId, 2)
	if _, st := fs.get(a.NodeId); !st.Ok() {
		t.Fatal("inode gone after 2 of 3 lookups were forgotten")
	} else {
		fs.put(fs.byID[a.NodeId])
	}
	fs.Forget(a.NodeId, 1)
	if _, st := fs.get(a.NodeId); st.Ok() {
		t.Fatal("inode still there after every lookup was forgotten")
	}
	if got := fs.fds.Load(); got != 1 {
		t.Fatalf("%d descriptors held after forget, want 1", got)
	}
	// Forgetting unknown or root nodes is harmless.
	fs.Forget(a.NodeId, 1)
	fs.Forget(rootID, 100)
	fs.Forget(1<<40, 1)
	var out fuse.AttrOut
	if st := fs.GetAttr(nil, &fuse.GetAttrIn{InHeader: hdr(rootID)}, &out); !st.Ok() || out.Mode&syscall.S_IFDIR == 0 {
		t.Fatalf("root getattr: %v %+v", st, out)
	}
	if st := fs.GetAttr(nil, &fuse.GetAttrIn{InHeader: hdr(a.NodeId)}, &out); st.Ok() {
		t.Fatal("getattr on a forgotten node succeeded")
	}
	// A missing name is a negative entry the guest may cache (with cache=never: ENOENT).
	var neg fuse.EntryOut
	h := hdr(rootID)
	if st := fs.Lookup(nil, &h, "missing", &neg); !st.Ok() || neg.NodeId != 0 || neg.EntryValid != 1 {
		t.Fatalf("negative lookup: %v %+v", st, neg)
	}
	nocache, err := newPassthrough(share, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	defer nocache.close()
	if st := nocache.Lookup(nil, &h, "missing", &neg); st != fuse.ENOENT {
		t.Fatalf("negative lookup without caching: %v", st)
	}
}

// TestInodeFollowsObject: an inode names the object it was looked up as, wherever that moves,
// and never a symlink or directory swapped in under its old name.
func TestInodeFollowsObject(t *testing.T) {
	share := t.TempDir()
	os.Mkdir(filepath.Join(share, "d"), 0o755)
	os.WriteFile(filepath.Join(share, "d", "f"), []byte("inside"), 0o644)
	outside := t.TempDir()
	os.WriteFile(filepath.Join(outside, "f"), []byte("outside"), 0o644)
	fs := newTestFS(t, share)
	d := mustLookup(t, fs, rootID, "d")
	os.Rename(filepath.Join(share, "d"), filepath.Join(share, "moved"))
	os.Symlink(outside, filepath.Join(share, "d"))
	f := mustLookup(t, fs, d.NodeId, "f")
	fh := mustOpen(t, fs, f.NodeId, os.O_RDONLY)
	if b := readAll(t, fs, fh, 64); string(b) != "inside" {
		t.Fatalf("read %q through the swapped directory", b)
	}
	fs.Release(nil, &fuse.ReleaseIn{Fh: fh})
	// The symlink itself: lookup gives a symlink node that cannot be opened or listed.
	l := mustLookup(t, fs, rootID, "d")
	if l.Mode&syscall.S_IFMT != syscall.S_IFLNK {
		t.Fatalf("mode %o", l.Mode)
	}
	var oo fuse.OpenOut
	if st := fs.Open(nil, &fuse.OpenIn{InHeader: hdr(l.NodeId)}, &oo); st != fuse.Status(syscall.ELOOP) {
		t.Fatalf("open of a symlink: %v, want ELOOP", st)
	}
	if st := fs.OpenDir(nil, &fuse.OpenIn{InHeader: hdr(l.NodeId)}, &oo); st.Ok() {
		t.Fatal("opendir of a symlink succeeded")
	}
	var e fuse.EntryOut
	h := hdr(l.NodeId)
	if st := fs.Lookup(nil, &h, "f", &e); st.Ok() {
		t.Fatal("lookup through a symlink node succeeded")
	}
	if tgt, st := fs.Readlink(nil, &h); !st.Ok() || string(tgt) != outside {
		t.Fatalf("readlink %q %v", tgt, st)
	}
}

// TestSetAttr: chmod, chown, truncate and times, with and without an open handle, including on
// a symlink (times and owner apply to the link itself).
func TestSetAttr(t *testing.T) {
	share := t.TempDir()
	p := filepath.Join(share, "f")
	os.WriteFile(p, []byte("0123456789"), 0o644)
	os.Symlink("f", filepath.Join(share, "s"))
	fs := newTestFS(t, share)
	f := mustLookup(t, fs, rootID, "f")
	var out fuse.AttrOut
	set := func(in fuse.SetAttrIn) fuse.Status {
		in.NodeId = f.NodeId
		return fs.SetAttr(nil, &in, &out)
	}
	if st := set(fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{Valid: fuse.FATTR_MODE, Mode: 0o600}}); !st.Ok() || out.Mode&07777 != 0o600 {
		t.Fatalf("chmod: %v %o", st, out.Mode)
	}
	if st := set(fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{Valid: fuse.FATTR_SIZE, Size: 4}}); !st.Ok() || out.Size != 4 {
		t.Fatalf("truncate by node: %v %d", st, out.Size)
	}
	fh := mustOpen(t, fs, f.NodeId, os.O_RDWR)
	defer fs.Release(nil, &fuse.ReleaseIn{Fh: fh})
	if st := set(fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{Valid: fuse.FATTR_SIZE | fuse.FATTR_FH, Fh: fh, Size: 2}}); !st.Ok() || out.Size != 2 {
		t.Fatalf("ftruncate: %v %d", st, out.Size)
	}
	if st := set(fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{Valid: fuse.FATTR_MODE | fuse.FATTR_FH, Fh: fh, Mode: 0o640}}); !st.Ok() || out.Mode&07777 != 0o640 {
		t.Fatalf("fchmod: %v %o", st, out.Mode)
	}
	if st := set(fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{Valid: fuse.FATTR_ATIME | fuse.FATTR_MTIME, Atime: 1000, Mtime: 2000, Mtimensec: 5}}); !st.Ok() || out.Atime != 1000 || out.Mtime != 2000 || out.Mtimensec != 5 {
		t.Fatalf("utimes: %v %+v", st, out.Attr)
	}
	if st := set(fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{Valid: fuse.FATTR_UID | fuse.FATTR_GID, Owner: fuse.Owner{Uid: 123, Gid: 456}}}); os.Geteuid() == 0 && (!st.Ok() || out.Uid != 123 || out.Gid != 456) {
		t.Fatalf("chown: %v %+v", st, out.Owner)
	}
	var hst syscall.Stat_t
	syscall.Stat(p, &hst)
	if hst.Size != 2 || hst.Mode&07777 != 0o640 || hst.Mtim.Sec != 2000 {
		t.Fatalf("host file: %+v", hst)
	}
	s := mustLookup(t, fs, rootID, "s")
	in := fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: hdr(s.NodeId), Valid: fuse.FATTR_MTIME, Mtime: 3000}}
	if st := fs.SetAttr(nil, &in, &out); !st.Ok() || out.Mtime != 3000 || out.Mode&syscall.S_IFMT != syscall.S_IFLNK {
		t.Fatalf("utimes on a symlink: %v %+v", st, out.Attr)
	}
	syscall.Stat(p, &hst)
	if hst.Mtim.Sec != 2000 {
		t.Fatal("utimes on the symlink changed its target")
	}
	in = fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: hdr(s.NodeId), Valid: fuse.FATTR_SIZE}}
	if st := fs.SetAttr(nil, &in, &out); st.Ok() {
		t.Fatal("truncating a symlink succeeded")
	}
}

// TestCreateModesAndOwner: new objects keep the mode the guest asked for (its umask is already
// applied, the daemon's must not apply again) and, as root, belong to the guest's caller.
func TestCreateModesAndOwner(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	share := t.TempDir()
	fs := newTestFS(t, share)
	caller := fuse.Caller{Owner: fuse.Owner{Uid: 1234, Gid: 2345}}
	var e fuse.EntryOut
	if st := fs.Mkdir(nil, &fuse.MkdirIn{InHeader: fuse.InHeader{NodeId: rootID, Caller: caller}, Mode: 0o755}, "d", &e); !st.Ok() {
		t.Fatal(st)
	}
	var co fuse.CreateOut
	if st := fs.Create(nil, &fuse.CreateIn{InHeader: fuse.InHeader{NodeId: e.NodeId, Caller: caller}, Flags: uint32(os.O_RDWR), Mode: syscall.S_IFREG | 0o664}, "f", &co); !st.Ok() {
		t.Fatal(st)
	}
	fs.Release(nil, &fuse.ReleaseIn{Fh: co.Fh})
	if st := fs.Mknod(nil, &fuse.MknodIn{InHeader: fuse.InHeader{NodeId: rootID, Caller: caller}, Mode: syscall.S_IFIFO | 0o620}, "p", &e); !st.Ok() {
		t.Fatal(st)
	}
	if st := fs.Mknod(nil, &fuse.MknodIn{InHeader: fuse.InHeader{NodeId: rootID, Caller: caller}, Mode: syscall.S_IFREG | syscall.S_ISUID | 0o755}, "suid", &e); !st.Ok() {
		t.Fatal(st)
	}
	for name, want := range map[string]uint32{"d": syscall.S_IFDIR | 0o755, "d/f": syscall.S_IFREG | 0o664, "p": syscall.S_IFIFO | 0o620, "suid": syscall.S_IFREG | 0o755} {
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(share, name), &st); err != nil {
			t.Fatal(err)
		}
		if st.Mode != want {
			t.Errorf("%s: mode %o, want %o", name, st.Mode, want)
		}
		if os.Geteuid() == 0 && (st.Uid != 1234 || st.Gid != 2345) {
			t.Errorf("%s: owner %d:%d, want the caller's 1234:2345", name, st.Uid, st.Gid)
		}
	}
	if st := fs.Mknod(nil, &fuse.MknodIn{InHeader: hdr(rootID), Mode: syscall.S_IFCHR | 0o666, Rdev: 1<<8 | 3}, "null", &e); st != fuse.EPERM {
		t.Fatalf("mknod of a device: %v", st)
	}
	var ri fuse.RenameIn
	ri.NodeId, ri.Newdir, ri.Flags = rootID, rootID, unix.RENAME_WHITEOUT
	if st := fs.Rename(nil, &ri, "p", "w"); st.Ok() {
		t.Fatal("RENAME_WHITEOUT succeeded")
	}
	ri.Flags = unix.RENAME_NOREPLACE
	if st := fs.Rename(nil, &ri, "p", "suid"); st != fuse.Status(syscall.EEXIST) {
		t.Fatalf("RENAME_NOREPLACE onto an existing name: %v", st)
	}
	ri.Flags = unix.RENAME_EXCHANGE
	if st := fs.Rename(nil, &ri, "p", "suid"); !st.Ok() {
		t.Fatalf("RENAME_EXCHANGE: %v", st)
	}
}

// TestReadDir lists a directory bigger than one reply in both READDIR and READDIRPLUS form,
// resuming from the offsets the replies carry, and seeks back to the start.
func TestReadDir(t *testing.T) {
	share := t.TempDir()
	want := []string{".", ".."}
	for i := 0; i < 300; i++ {
		name := "file-with-a-longish-name-" + string(rune('a'+i%26)) + "-" + time.Duration(i).String()
		os.WriteFile(filepath.Join(share, name), nil, 0o644)
		want = append(want, name)
	}
	os.Symlink("x", filepath.Join(share, "link"))
	want = append(want, "link")
	sort.Strings(want)
	fs := newTestFS(t, share)
	for _, plus := range []bool{false, true} {
		var oo fuse.OpenOut
		if st := fs.OpenDir(nil, &fuse.OpenIn{InHeader: hdr(rootID)}, &oo); !st.Ok() {
			t.Fatal(st)
		}
		list := func(off uint64) (names []string, next uint64) {
			buf := make([]byte, 4096)
			l := fuse.NewDirEntryList(buf, off)
			in := &fuse.ReadIn{InHeader: hdr(rootID), Fh: oo.Fh, Offset: off, Size: 4096}
			var st fuse.Status
			if plus {
				st = fs.ReadDirPlus(nil, in, l)
			} else {
				st = fs.ReadDir(nil, in, l)
			}
			if !st.Ok() {
				t.Fatal(st)
			}
			b := l.Bytes()
			for len(b) > 0 {
				var eo fuse.EntryOut
				if plus {
					eo = *(*fuse.EntryOut)(unsafePointer(b))
					b = b[entryOutSize:]
				}
				off := le64(b[8:])
				namelen := int(le32(b[16:]))
				name := string(b[24 : 24+namelen])
				b = b[(24+namelen+7)&^7:]
				names = append(names, name)
				next = off
				if plus && name != "." && name != ".." {
					if eo.NodeId == 0 || eo.Ino == 0 {
						t.Fatalf("readdirplus entry %q without a node: %+v", name, eo)
					}
					if name == "link" && eo.Mode&syscall.S_IFMT != syscall.S_IFLNK {
						t.Fatalf("link: mode %o", eo.Mode)
					}
				}
			}
			return names, next
		}
		var got []string
		calls := 0
		for off := uint64(0); ; calls++ {
			names, next := list(off)
			if len(names) == 0 {
				break
			}
			got = append(got, names...)
			off = next
		}
		sort.Strings(got)
		if calls < 3 || !slices.Equal(got, want) {
			t.Fatalf("plus=%v: %d calls, %d names, want %d", plus, calls, len(got), len(want))
		}
		// Seeking back to 0 lists from the start again.
		if names, _ := list(0); len(names) == 0 {
			t.Fatal("no entries after seeking back to 0")
		}
		fs.ReleaseDir(&fuse.ReleaseIn{Fh: oo.Fh})
	}
}

// TestLocksAndRanges covers the handle operations the harness does not: POSIX (OFD) and flock
// locks between two opens, fallocate, SEEK_DATA/SEEK_HOLE, copy_file_range, fsync, flush,
// statfs and access.
func TestLocksAndRanges(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), bytes.Repeat([]byte("a"), 8192), 0o644)
	fs := newTestFS(t, share)
	f := mustLookup(t, fs, rootID, "f")
	a, b := mustOpen(t, fs, f.NodeId, os.O_RDWR), mustOpen(t, fs, f.NodeId, os.O_RDWR)
	lk := fuse.FileLock{Start: 0, End: 99, Typ: syscall.F_WRLCK}
	if st := fs.SetLk(nil, &fuse.LkIn{Fh: a, Lk: lk}); !st.Ok() {
		t.Fatalf("setlk: %v", st)
	}
	if st := fs.SetLk(nil, &fuse.LkIn{Fh: b, Lk: lk}); st != fuse.EAGAIN {
		t.Fatalf("conflicting setlk: %v, want EAGAIN", st)
	}
	var lo fuse.LkOut
	if st := fs.GetLk(nil, &fuse.LkIn{Fh: b, Lk: lk}, &lo); !st.Ok() || lo.Lk.Typ != syscall.F_WRLCK {
		t.Fatalf("getlk: %v %+v", st, lo)
	}
	// Flush (close of a dup) keeps the lock: they are OFD locks.
	if st := fs.Flush(nil, &fuse.FlushIn{Fh: a}); !st.Ok() {
		t.Fatal(st)
	}
	if st := fs.SetLk(nil, &fuse.LkIn{Fh: b, Lk: lk}); st != fuse.EAGAIN {
		t.Fatalf("lock lost at flush: %v", st)
	}
	fl := fuse.FileLock{Typ: syscall.F_WRLCK}
	if st := fs.SetLk(nil, &fuse.LkIn{Fh: a, Lk: fl, LkFlags: fuse.FUSE_LK_FLOCK}); !st.Ok() {
		t.Fatal(st)
	}
	if st := fs.SetLk(nil, &fuse.LkIn{Fh: b, Lk: fl, LkFlags: fuse.FUSE_LK_FLOCK}); st != fuse.EAGAIN {
		t.Fatalf("conflicting flock: %v", st)
	}
	fs.Release(nil, &fuse.ReleaseIn{Fh: a}) // closing the description drops both locks
	if st := fs.SetLk(nil, &fuse.LkIn{Fh: b, Lk: lk}); !st.Ok() {
		t.Fatalf("setlk after the holder released: %v", st)
	}
	if st := fs.Fallocate(nil, &fuse.FallocateIn{Fh: b, Offset: 1 << 20, Length: 4096}); !st.Ok() {
		t.Fatalf("fallocate: %v", st)
	}
	var so fuse.LseekOut
	if st := fs.Lseek(nil, &fuse.LseekIn{Fh: b, Offset: 0, Whence: unix.SEEK_HOLE}, &so); !st.Ok() || so.Offset < 8192 {
		t.Fatalf("SEEK_HOLE: %v %d", st, so.Offset)
	}
	if st := fs.Lseek(nil, &fuse.LseekIn{Fh: b, Whence: unix.SEEK_END}, &so); st.Ok() {
		t.Fatal("SEEK_END reached the daemon's descriptor")
	}
	var co fuse.CreateOut
	if st := fs.Create(nil, &fuse.CreateIn{InHeader: hdr(rootID), Flags: uint32(os.O_RDWR), Mode: 0o644}, "copy", &co); !st.Ok() {
		t.Fatal(st)
	}
	if n, st := fs.CopyFileRange(nil, &fuse.CopyFileRangeIn{FhIn: b, OffIn: 100, FhOut: co.Fh, OffOut: 0, Len: 1000}); !st.Ok() || n != 1000 {
		t.Fatalf("copy_file_range: %d %v", n, st)
	}
	if st := fs.Fsync(nil, &fuse.FsyncIn{Fh: co.Fh, FsyncFlags: 1}); !st.Ok() {
		t.Fatal(st)
	}
	if fi, _ := os.Stat(filepath.Join(share, "copy")); fi.Size() != 1000 {
		t.Fatalf("copy is %d bytes", fi.Size())
	}
	var so2 fuse.StatfsOut
	h := hdr(rootID)
	if st := fs.StatFs(nil, &h, &so2); !st.Ok() || so2.Bsize == 0 {
		t.Fatalf("statfs: %v %+v", st, so2)
	}
	if st := fs.Access(nil, &fuse.AccessIn{InHeader: hdr(f.NodeId), Mask: fuse.R_OK | fuse.W_OK}); !st.Ok() {
		t.Fatalf("access: %v", st)
	}
	// Handles the daemon never gave out, or already released, are EBADF.
	for _, fh := range []uint64{0, a, 1 << 50} {
		if _, st := fs.Writev(nil, &fuse.WriteIn{Fh: fh}, [][]byte{[]byte("x")}); st != fuse.EBADF {
			t.Fatalf("write to fh %d: %v", fh, st)
		}
		if _, st := fs.Read(nil, &fuse.ReadIn{Fh: fh, Size: 10}, nil); st != fuse.EBADF {
			t.Fatalf("read from fh %d: %v", fh, st)
		}
	}
	fs.Release(nil, &fuse.ReleaseIn{Fh: b})
	fs.Release(nil, &fuse.ReleaseIn{Fh: co.Fh})
	if got := fs.fds.Load(); got != 3 { // root, f, copy
		t.Fatalf("%d descriptors held after every handle was released, want 3", got)
	}
}

// TestHardLinkSymlink: LINK of a symlink node links the symlink itself, not its target.
func TestHardLinkSymlink(t *testing.T) {
	share := t.TempDir()
	os.Symlink("/etc/passwd", filepath.Join(share, "s"))
	fs := newTestFS(t, share)
	s := mustLookup(t, fs, rootID, "s")
	var e fuse.EntryOut
	if st := fs.Link(nil, &fuse.LinkIn{InHeader: hdr(rootID), Oldnodeid: s.NodeId}, "s2", &e); !st.Ok() {
		t.Fatalf("link: %v", st)
	}
	if e.NodeId != s.NodeId || e.Nlink != 2 {
		t.Fatalf("link entry %+v", e)
	}
	if tgt, err := os.Readlink(filepath.Join(share, "s2")); err != nil || tgt != "/etc/passwd" {
		t.Fatalf("s2 is not the symlink: %q %v", tgt, err)
	}
}

// TestXattr: user xattrs round-trip; symlinks and FIFOs have none (and never block).
func TestXattr(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), nil, 0o644)
	syscall.Mkfifo(filepath.Join(share, "p"), 0o644)
	fs := newTestFS(t, share)
	f := mustLookup(t, fs, rootID, "f")
	if st := fs.SetXAttr(nil, &fuse.SetXAttrIn{InHeader: hdr(f.NodeId)}, "user.k", []byte("v1")); !st.Ok() {
		t.Fatal(st)
	}
	h := hdr(f.NodeId)
	if n, st := fs.GetXAttr(nil, &h, "user.k", nil); (!st.Ok() && st != fuse.ERANGE) || n != 2 {
		t.Fatalf("size query: %d %v", n, st)
	}
	buf := make([]byte, 16)
	if n, st := fs.GetXAttr(nil, &h, "user.k", buf); !st.Ok() || string(buf[:n]) != "v1" {
		t.Fatalf("get: %q %v", buf[:n], st)
	}
	if n, st := fs.ListXAttr(nil, &h, buf); !st.Ok() || !bytes.Contains(buf[:n], []byte("user.k\x00")) {
		t.Fatalf("list: %q %v", buf[:n], st)
	}
	if st := fs.RemoveXAttr(nil, &h, "user.k"); !st.Ok() {
		t.Fatal(st)
	}
	// Through the guard: attributes that grant host privileges are refused, xattrs are off
	// unless enabled, and read-only shares refuse changes.
	g := &guard{RawFileSystem: fs, xattr: true}
	for _, attr := range []string{"security.capability", "trusted.overlay.opaque"} {
		if st := g.SetXAttr(nil, &fuse.SetXAttrIn{InHeader: hdr(f.NodeId)}, attr, []byte{1}); st != fuse.EPERM {
			t.Errorf("set %s: %v, want EPERM", attr, st)
		}
		if st := g.RemoveXAttr(nil, &h, attr); st != fuse.EPERM {
			t.Errorf("remove %s: %v, want EPERM", attr, st)
		}
	}
	if st := g.SetXAttr(nil, &fuse.SetXAttrIn{InHeader: hdr(f.NodeId)}, "user.ok", []byte("1")); !st.Ok() {
		t.Fatalf("set user.ok through the guard: %v", st)
	}
	if st := (&guard{RawFileSystem: fs}).SetXAttr(nil, &fuse.SetXAttrIn{InHeader: hdr(f.NodeId)}, "user.ok", nil); st != fuse.ENOSYS {
		t.Errorf("xattrs off: %v, want ENOSYS", st)
	}
	if st := (&guard{RawFileSystem: fs, xattr: true, readOnly: true}).RemoveXAttr(nil, &h, "user.ok"); st != fuse.EROFS {
		t.Errorf("read-only remove: %v, want EROFS", st)
	}
	p := mustLookup(t, fs, rootID, "p")
	hp := hdr(p.NodeId)
	if _, st := fs.GetXAttr(nil, &hp, "user.k", buf); st.Ok() {
		t.Fatal("xattr on a fifo")
	}
}

// TestCreateExisting: CREATE of a name the host already has (the guest's cache did not know it)
// opens the file as it is (owner and mode untouched) unless O_EXCL was asked for, and never
// opens a symlink or a device node that sits there.
func TestCreateExisting(t *testing.T) {
	share := t.TempDir()
	p := filepath.Join(share, "f")
	os.WriteFile(p, []byte("old"), 0o600)
	os.Chown(p, 4321, 4321)
	os.Symlink("/etc/passwd", filepath.Join(share, "s"))
	if os.Geteuid() == 0 {
		if err := syscall.Mknod(filepath.Join(share, "null"), syscall.S_IFCHR|0o666, 1<<8|3); err != nil {
			t.Fatal(err)
		}
	}
	fs := newTestFS(t, share)
	caller := fuse.Caller{Owner: fuse.Owner{Uid: 1234, Gid: 1234}}
	create := func(name string, flags int) (fuse.CreateOut, fuse.Status) {
		var co fuse.CreateOut
		st := fs.Create(nil, &fuse.CreateIn{InHeader: fuse.InHeader{NodeId: rootID, Caller: caller}, Flags: uint32(flags), Mode: syscall.S_IFREG | 0o666}, name, &co)
		return co, st
	}
	if _, st := create("f", os.O_RDWR|os.O_EXCL); st != fuse.Status(syscall.EEXIST) {
		t.Fatalf("O_EXCL on an existing file: %v", st)
	}
	co, st := create("f", os.O_RDWR|os.O_TRUNC)
	if !st.Ok() || co.NodeId == 0 || co.Fh == 0 {
		t.Fatalf("create of an existing file: %v %+v", st, co)
	}
	if _, st := fs.Writev(nil, &fuse.WriteIn{Fh: co.Fh}, [][]byte{[]byte("new")}); !st.Ok() {
		t.Fatal(st)
	}
	fs.Release(nil, &fuse.ReleaseIn{Fh: co.Fh})
	var hst syscall.Stat_t
	syscall.Stat(p, &hst)
	if b, _ := os.ReadFile(p); string(b) != "new" || hst.Mode&07777 != 0o600 || (os.Geteuid() == 0 && hst.Uid != 4321) {
		t.Fatalf("existing file after create: %q mode %o uid %d", b, hst.Mode&07777, hst.Uid)
	}
	held := fs.fds.Load()
	if _, st := create("s", os.O_RDONLY); st != fuse.Status(syscall.ELOOP) {
		t.Fatalf("create over a symlink: %v, want ELOOP", st)
	}
	if os.Geteuid() == 0 {
		if _, st := create("null", os.O_RDWR); st != fuse.EPERM {
			t.Fatalf("create over a device node: %v, want EPERM", st)
		}
	}
	if got := fs.fds.Load(); got != held {
		t.Fatalf("refused creates left descriptors behind: %d, was %d", got, held)
	}
}

// TestOpenSpecialFiles: FIFOs, sockets and device nodes are never opened through the daemon (a
// guest kernel keeps them local; a FIFO open would block a daemon thread).
func TestOpenSpecialFiles(t *testing.T) {
	share := t.TempDir()
	syscall.Mkfifo(filepath.Join(share, "fifo"), 0o666)
	l, err := net.Listen("unix", filepath.Join(share, "sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	names := []string{"fifo", "sock"}
	if os.Geteuid() == 0 {
		syscall.Mknod(filepath.Join(share, "null"), syscall.S_IFCHR|0o666, 1<<8|3)
		names = append(names, "null")
	}
	fs := newTestFS(t, share)
	for _, name := range names {
		e := mustLookup(t, fs, rootID, name)
		for _, flags := range []int{os.O_RDONLY, os.O_WRONLY, os.O_RDWR} {
			var oo fuse.OpenOut
			if st := fs.Open(nil, &fuse.OpenIn{InHeader: hdr(e.NodeId), Flags: uint32(flags)}, &oo); st != fuse.EPERM {
				t.Errorf("open %s %#x: %v, want EPERM", name, flags, st)
			}
		}
	}
}

// TestCloseReleasesDescriptors: replacing a session closes every descriptor it holds, but only
// once the requests still using one (here a READ not yet copied out) are done with it.
func TestCloseReleasesDescriptors(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("data"), 0o644)
	os.Mkdir(filepath.Join(share, "d"), 0o755)
	fs, err := newPassthrough(share, time.Second, false)
	if err != nil {
		t.Fatal(err)
	}
	f := mustLookup(t, fs, rootID, "f")
	mustLookup(t, fs, rootID, "d")
	fh := mustOpen(t, fs, f.NodeId, os.O_RDONLY)
	rr, st := fs.Read(nil, &fuse.ReadIn{Fh: fh, Size: 4}, nil)
	if !st.Ok() {
		t.Fatal(st)
	}
	fs.close()
	if got := fs.fds.Load(); got != 1 {
		t.Fatalf("%d descriptors open after close with a READ in flight, want 1 (its file)", got)
	}
	buf := make([]byte, 4)
	if n, st := rr.(interface {
		Readv([][]byte) (int, fuse.Status)
	}).Readv([][]byte{buf}); !st.Ok() || string(buf[:n]) != "data" {
		t.Fatalf("in-flight read after close: %q %v", buf[:n], st)
	}
	rr.Done()
	if got := fs.fds.Load(); got != 0 {
		t.Fatalf("%d descriptors open after the last request finished", got)
	}
	var e fuse.EntryOut
	h := hdr(rootID)
	if st := fs.Lookup(nil, &h, "f", &e); st.Ok() {
		t.Fatal("lookup on a closed session succeeded")
	}
	fs.close() // twice is harmless
}

// TestCreateSetgidDir: a caller with the daemon's own ids gets no chown, so a setgid directory
// gives new files its group, as on a local file system.
func TestCreateSetgidDir(t *testing.T) {
	cmdtest.RequireRoot(t) // to give the directory a group of its own
	share := t.TempDir()
	d := filepath.Join(share, "d")
	os.Mkdir(d, 0o775)
	os.Chown(d, 0, 4242)
	if err := syscall.Chmod(d, 0o2775); err != nil {
		t.Fatal(err)
	}
	fs := newTestFS(t, share)
	de := mustLookup(t, fs, rootID, "d")
	self := fuse.Caller{Owner: fuse.Owner{Uid: uint32(os.Geteuid()), Gid: uint32(os.Getegid())}}
	var co fuse.CreateOut
	if st := fs.Create(nil, &fuse.CreateIn{InHeader: fuse.InHeader{NodeId: de.NodeId, Caller: self}, Flags: uint32(os.O_RDWR), Mode: syscall.S_IFREG | 0o644}, "f", &co); !st.Ok() {
		t.Fatal(st)
	}
	fs.Release(nil, &fuse.ReleaseIn{Fh: co.Fh})
	if co.Gid != 4242 {
		t.Fatalf("new file's group %d, want the setgid directory's 4242", co.Gid)
	}
	if co.NodeId == 0 || co.Ino == 0 {
		t.Fatalf("entry %+v", co.EntryOut)
	}
}
