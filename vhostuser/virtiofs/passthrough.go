package virtiofs

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// passthrough is the FUSE file system the daemon serves: a raw (node-ID level) pass-through of
// the shared directory in which every inode the guest knows is held open as an O_PATH file
// descriptor and every operation is relative to one, in the manner of C virtiofsd's
// passthrough_ll. Nothing is ever resolved by path from the share's root:
//
//   - LOOKUP resolves one name (never "/", ".", "..") under its parent's descriptor with
//     O_NOFOLLOW, so a symlink or a directory swapped in behind the guest's back is never
//     followed; an inode keeps naming the object it was looked up as, wherever that moves.
//   - Files are opened by re-opening the inode's own descriptor through /proc/self/fd (opened
//     before the sandbox's pivot_root, like C virtiofsd), never by name: symlinks refuse to open
//     (ELOOP), device nodes refuse (EPERM).
//   - Inodes are keyed by (st_dev, st_ino): a name looked up again, or a hard link, gives the
//     guest the node ID it already has, and a repeated lookup of a known inode costs a single
//     fstatat.
//
// Node IDs and file handles are indices into tables; a forged one fails with ESTALE or EBADF.
// Inodes and handles are reference counted, so a FORGET or RELEASE racing a request on the same
// object (or a session torn down while requests run) closes the descriptor only once nothing
// uses it: a request can never reach a descriptor number that was reused for something else.
//
// go-fuse's own loopback node tree (fs.NewLoopbackRoot) resolves paths from the root on each
// open, allocates a node and an inode per LOOKUP and sorts the locks of every node a request
// touches; it cost the daemon 25-40% more CPU per small request than the C daemon.
type passthrough struct {
	fuse.RawFileSystem // ENOSYS for what is not implemented (statx, tmpfile, poll, ioctl)

	procFD    int // /proc/self/fd, O_PATH
	ttl       time.Duration
	keepCache bool // --cache always: the guest keeps file data across opens
	// uid and gid are ours. As root (of the sandbox) new files are given to the guest's caller
	// unless the caller has our ids.
	uid, gid uint32
	umask    uint32

	fdLimit int64        // descriptors this file system may hold (inodes + handles)
	fds     atomic.Int64 // descriptors it holds

	// closed is set first by close; the tables and the wait channel are emptied under their own
	// locks after it, so whatever is added under a lock before that is released with the rest.
	closed atomic.Bool

	mu     sync.RWMutex
	byID   map[uint64]*inode
	byKey  map[devIno]*inode
	nextID uint64

	hmu     sync.RWMutex
	handles map[uint64]*fileHandle
	nextFh  uint64

	wmu        sync.Mutex
	waitCancel chan struct{} // closed to make the lock waits running now give up
}

type devIno struct{ dev, ino uint64 }

type inode struct {
	id  uint64
	key devIno
	fd  int    // O_PATH|O_NOFOLLOW
	typ uint32 // S_IFMT bits
	// nlookup is the kernel's lookup count: raised under fs.mu held for reading, lowered under
	// fs.mu held for writing, so an inode leaves the tables exactly when it reaches zero.
	nlookup atomic.Int64
	// refs counts the tables' reference and each request using the inode; the last one closes fd.
	refs atomic.Int32
}

type fileHandle struct {
	fd   int
	refs atomic.Int32
	dir  *dirStream // OPENDIR handles
}

const rootID = 1 // FUSE_ROOT_ID

// procSelfFD is /proc/self/fd opened O_PATH, once per process, before EnterSandbox detaches /proc.
var procSelfFD = sync.OnceValues(func() (int, error) {
	return unix.Open("/proc/self/fd", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
})

func newPassthrough(dir string, ttl time.Duration, keepCache bool) (*passthrough, error) {
	proc, err := procSelfFD()
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: "/proc/self/fd", Err: err}
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "stat", Path: dir, Err: err}
	}
	fs := &passthrough{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		procFD:        proc,
		ttl:           ttl,
		keepCache:     keepCache,
		uid:           uint32(os.Geteuid()),
		gid:           uint32(os.Getegid()),
		umask:         processUmask(),
		byID:          map[uint64]*inode{},
		byKey:         map[devIno]*inode{},
		nextID:        rootID + 1,
		handles:       map[uint64]*fileHandle{},
		nextFh:        1,
		waitCancel:    make(chan struct{}),
	}
	var r unix.Rlimit
	fs.fdLimit = 1 << 20
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &r) == nil && r.Cur < uint64(fs.fdLimit) {
		// Keep a reserve for what the daemon itself needs (vhost-user messages carry eventfds
		// and memory fds, a reconnecting frontend needs a socket).
		fs.fdLimit = max(int64(r.Cur)-64, 16)
	}
	root := &inode{id: rootID, key: devIno{st.Dev, st.Ino}, fd: fd, typ: unix.S_IFDIR}
	root.nlookup.Store(1 << 62) // never forgotten
	root.refs.Store(1)
	fs.fds.Add(1)
	fs.byID[rootID] = root
	fs.byKey[root.key] = root
	return fs, nil
}

// processUmask reads the umask without changing it (other goroutines may be creating files).
func processUmask() uint32 {
	b, err := os.ReadFile("/proc/self/status")
	if err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			if v, ok := bytes.CutPrefix(sc.Bytes(), []byte("Umask:")); ok {
				if m, err := strconv.ParseUint(string(bytes.TrimSpace(v)), 8, 32); err == nil {
					return uint32(m)
				}
			}
		}
	}
	return 0o022
}

func (fs *passthrough) String() string { return "virtkit-passthrough" }

// close drops the tables' references: descriptors close as the requests still using them finish.
// The device calls it when a session is replaced (guest reboot, reconnect) or the daemon stops.
func (fs *passthrough) close() {
	if fs.closed.Swap(true) {
		return
	}
	fs.wmu.Lock()
	close(fs.waitCancel) // and every later wait gives up at once: cancelWaits leaves it closed
	fs.wmu.Unlock()
	fs.mu.Lock()
	inodes := fs.byID
	fs.byID, fs.byKey = map[uint64]*inode{}, map[devIno]*inode{}
	fs.mu.Unlock()
	for _, n := range inodes {
		fs.put(n)
	}
	fs.hmu.Lock()
	hs := fs.handles
	fs.handles = map[uint64]*fileHandle{}
	fs.hmu.Unlock()
	for _, h := range hs {
		fs.putHandle(h)
	}
}

// get returns the inode for a node ID with a reference the caller must put.
func (fs *passthrough) get(id uint64) (*inode, fuse.Status) {
	fs.mu.RLock()
	n := fs.byID[id]
	if n != nil {
		n.refs.Add(1)
	}
	fs.mu.RUnlock()
	if n == nil {
		return nil, fuse.Status(syscall.ESTALE)
	}
	return n, fuse.OK
}

func (fs *passthrough) put(n *inode) {
	if n.refs.Add(-1) == 0 {
		unix.Close(n.fd)
		fs.fds.Add(-1)
	}
}

// reserveFD accounts for a descriptor about to be opened; false means the file system is at its
// limit and the guest gets EMFILE (the daemon keeps working).
func (fs *passthrough) reserveFD() bool {
	if fs.fds.Add(1) > fs.fdLimit {
		fs.fds.Add(-1)
		return false
	}
	return true
}

// procName is an inode's descriptor as a name under /proc/self/fd.
func procName(fd int) string { return strconv.Itoa(fd) }

// reopen opens an inode's object for I/O through /proc/self/fd/N.
func (fs *passthrough) reopen(n *inode, flags int) (int, error) {
	return unix.Openat(fs.procFD, procName(n.fd), flags|unix.O_CLOEXEC, 0)
}

func (fs *passthrough) fillEntry(out *fuse.EntryOut, id uint64, st *unix.Stat_t) {
	out.NodeId = id
	out.Generation = 0 // node IDs are never reused
	out.EntryValid, out.EntryValidNsec = splitDuration(fs.ttl)
	out.AttrValid, out.AttrValidNsec = out.EntryValid, out.EntryValidNsec
	fillAttr(&out.Attr, st)
}

// attrOf answers GETATTR and SETATTR: n's attributes as they are now.
func (fs *passthrough) attrOf(n *inode, out *fuse.AttrOut) fuse.Status {
	var st unix.Stat_t
	if err := unix.Fstatat(n.fd, "", &st, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return errStatus(err)
	}
	out.AttrValid, out.AttrValidNsec = splitDuration(fs.ttl)
	fillAttr(&out.Attr, &st)
	return fuse.OK
}

func splitDuration(d time.Duration) (uint64, uint32) {
	return uint64(d / time.Second), uint32(d % time.Second)
}

// fillAttr is go-fuse's Attr.FromStat for unix.Stat_t: FromStat takes syscall.Stat_t, and the
// syscall package has no fstatat on amd64.
func fillAttr(a *fuse.Attr, st *unix.Stat_t) {
	a.Ino = st.Ino
	a.Size = uint64(st.Size)
	a.Blocks = uint64(st.Blocks)
	a.Atime, a.Atimensec = uint64(st.Atim.Sec), uint32(st.Atim.Nsec)
	a.Mtime, a.Mtimensec = uint64(st.Mtim.Sec), uint32(st.Mtim.Nsec)
	a.Ctime, a.Ctimensec = uint64(st.Ctim.Sec), uint32(st.Ctim.Nsec)
	a.Mode = st.Mode
	a.Nlink = uint32(st.Nlink)
	a.Uid, a.Gid = st.Uid, st.Gid
	a.Rdev = uint32(st.Rdev)
	a.Blksize = uint32(st.Blksize)
}

// badName reports names that could walk out of their directory or confuse path joins.
func badName(name string) bool {
	return name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || len(name) > 255
}

func errStatus(err error) fuse.Status {
	if err == nil {
		return fuse.OK
	}
	return fuse.ToStatus(err)
}

// lookupAt resolves name in dir and counts one lookup of the result.
func (fs *passthrough) lookupAt(dir *inode, name string, out *fuse.EntryOut) fuse.Status {
	if badName(name) {
		return fuse.Status(syscall.ENOENT)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(dir.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return errStatus(err)
	}
	// A known inode: the name named it when fstatat ran, and we hold it open, so it is that
	// object. No descriptor is needed.
	if fs.known(&st, out) {
		return fuse.OK
	}
	return fs.adopt(func() (int, error) {
		return unix.Openat(dir.fd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}, nil, out)
}

// lookupNew counts a lookup of an object this request just made under name in dir: it is opened
// first and then looked at, one system call fewer than lookupAt.
func (fs *passthrough) lookupNew(dir *inode, name string, out *fuse.EntryOut) fuse.Status {
	return fs.adopt(func() (int, error) {
		return unix.Openat(dir.fd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}, nil, out)
}

// known counts a lookup of the inode st describes if the guest has it already.
func (fs *passthrough) known(st *unix.Stat_t, out *fuse.EntryOut) bool {
	fs.mu.RLock()
	n := fs.byKey[devIno{st.Dev, st.Ino}]
	if n != nil {
		n.nlookup.Add(1)
	}
	fs.mu.RUnlock()
	if n != nil {
		fs.fillEntry(out, n.id, st)
	}
	return n != nil
}

// adopt counts a lookup of the object open returns an O_PATH descriptor for: the inode the guest
// already has for it, or a new one holding that descriptor. st, when given, already describes
// the object (it was taken from a descriptor for it); otherwise the new descriptor is looked at.
func (fs *passthrough) adopt(open func() (int, error), st *unix.Stat_t, out *fuse.EntryOut) fuse.Status {
	if !fs.reserveFD() {
		return fuse.Status(syscall.EMFILE)
	}
	fd, err := open()
	if err != nil {
		fs.fds.Add(-1)
		return errStatus(err)
	}
	if st == nil {
		st = new(unix.Stat_t)
		if err := unix.Fstatat(fd, "", st, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			unix.Close(fd)
			fs.fds.Add(-1)
			return errStatus(err)
		}
	}
	key := devIno{st.Dev, st.Ino}
	fs.mu.Lock()
	n := fs.byKey[key]
	switch {
	case fs.closed.Load():
		fs.mu.Unlock()
		unix.Close(fd)
		fs.fds.Add(-1)
		return fuse.Status(syscall.ESTALE)
	case n != nil: // found under another name, or by a concurrent lookup
		n.nlookup.Add(1)
		fs.mu.Unlock()
		unix.Close(fd)
		fs.fds.Add(-1)
	default:
		n = &inode{id: fs.nextID, key: key, fd: fd, typ: st.Mode & unix.S_IFMT}
		fs.nextID++
		n.nlookup.Store(1)
		n.refs.Store(1)
		fs.byID[n.id] = n
		fs.byKey[key] = n
		fs.mu.Unlock()
	}
	fs.fillEntry(out, n.id, st)
	return fuse.OK
}

func (fs *passthrough) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	dir, st := fs.get(h.NodeId)
	if !st.Ok() {
		return st
	}
	defer fs.put(dir)
	st = fs.lookupAt(dir, name, out)
	if st == fuse.ENOENT && fs.ttl > 0 && !badName(name) { // a bad name is never one to cache
		// A negative entry the guest may cache as long as positive ones (node ID 0), as C
		// virtiofsd does: compilers and shells probe many names that do not exist.
		*out = fuse.EntryOut{}
		out.EntryValid, out.EntryValidNsec = splitDuration(fs.ttl)
		return fuse.OK
	}
	return st
}

func (fs *passthrough) Forget(id, nlookup uint64) {
	if id == rootID {
		return
	}
	fs.mu.Lock()
	n := fs.byID[id]
	if n == nil {
		fs.mu.Unlock()
		return
	}
	if n.nlookup.Add(-int64(min(nlookup, 1<<62))) > 0 {
		fs.mu.Unlock()
		return
	}
	delete(fs.byID, id)
	delete(fs.byKey, n.key)
	fs.mu.Unlock()
	fs.put(n)
}

func (fs *passthrough) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	n, s := fs.get(in.NodeId)
	if !s.Ok() {
		return s
	}
	defer fs.put(n)
	return fs.attrOf(n, out)
}

func (fs *passthrough) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	n, s := fs.get(in.NodeId)
	if !s.Ok() {
		return s
	}
	defer fs.put(n)
	// An open handle the kernel names (ftruncate, fchmod, futimens) is used directly.
	hfd := -1
	if in.Valid&fuse.FATTR_FH != 0 {
		if h := fs.getHandle(in.Fh); h != nil {
			defer fs.putHandle(h)
			hfd = h.fd
		}
	}
	if in.Valid&fuse.FATTR_MODE != 0 {
		var err error
		switch {
		case hfd >= 0:
			err = unix.Fchmod(hfd, in.Mode&07777)
		case n.typ == unix.S_IFLNK:
			err = unix.EOPNOTSUPP // Linux has no symlink modes
		default:
			err = unix.Fchmodat(fs.procFD, procName(n.fd), in.Mode&07777, 0)
		}
		if err != nil {
			return errStatus(err)
		}
	}
	if in.Valid&(fuse.FATTR_UID|fuse.FATTR_GID) != 0 {
		uid, gid := -1, -1
		if in.Valid&fuse.FATTR_UID != 0 {
			uid = int(in.Uid)
		}
		if in.Valid&fuse.FATTR_GID != 0 {
			gid = int(in.Gid)
		}
		if err := unix.Fchownat(n.fd, "", uid, gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return errStatus(err)
		}
	}
	if in.Valid&fuse.FATTR_SIZE != 0 {
		var err error
		switch {
		case hfd >= 0:
			err = unix.Ftruncate(hfd, int64(in.Size))
		case n.typ == unix.S_IFDIR:
			err = unix.EISDIR
		case n.typ != unix.S_IFREG:
			err = unix.EINVAL
		default:
			var fd int
			if fd, err = fs.reopen(n, unix.O_WRONLY); err == nil {
				err = unix.Ftruncate(fd, int64(in.Size))
				unix.Close(fd)
			}
		}
		if err != nil {
			return errStatus(err)
		}
	}
	if in.Valid&(fuse.FATTR_ATIME|fuse.FATTR_MTIME|fuse.FATTR_ATIME_NOW|fuse.FATTR_MTIME_NOW) != 0 {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		switch {
		case in.Valid&fuse.FATTR_ATIME_NOW != 0:
			ts[0].Nsec = unix.UTIME_NOW
		case in.Valid&fuse.FATTR_ATIME != 0:
			ts[0] = unix.Timespec{Sec: int64(in.Atime), Nsec: int64(in.Atimensec)}
		}
		switch {
		case in.Valid&fuse.FATTR_MTIME_NOW != 0:
			ts[1].Nsec = unix.UTIME_NOW
		case in.Valid&fuse.FATTR_MTIME != 0:
			ts[1] = unix.Timespec{Sec: int64(in.Mtime), Nsec: int64(in.Mtimensec)}
		}
		fd := n.fd
		if hfd >= 0 {
			fd = hfd
		}
		if err := unix.UtimesNanoAt(fd, "", ts, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return errStatus(err)
		}
	}
	return fs.attrOf(n, out)
}

// created finishes a MKDIR, MKNOD, SYMLINK or CREATE: the new object belongs to the guest's
// caller (when we are root and the caller is someone else), keeps the mode the guest asked for,
// and is looked up. fd, for CREATE, is the new file open for I/O.
func (fs *passthrough) created(dir *inode, name string, caller fuse.Caller, mode uint32, fd int, out *fuse.EntryOut) fuse.Status {
	if fs.uid == 0 && (caller.Uid != fs.uid || caller.Gid != fs.gid) {
		// Errors are ignored: an id the sandbox's user namespace cannot map stays ours.
		if fd >= 0 {
			unix.Fchown(fd, int(caller.Uid), int(caller.Gid))
		} else {
			unix.Fchownat(dir.fd, name, int(caller.Uid), int(caller.Gid), unix.AT_SYMLINK_NOFOLLOW)
		}
	}
	if mode&fs.umask&07777 != 0 && mode&unix.S_IFMT != unix.S_IFLNK {
		// The guest already applied its umask; ours must not take more bits away.
		if fd >= 0 {
			unix.Fchmod(fd, mode&07777)
		} else {
			unix.Fchmodat(dir.fd, name, mode&07777, 0)
		}
	}
	if fd < 0 {
		return fs.lookupNew(dir, name, out)
	}
	// The file is open: look at it and take its O_PATH descriptor through /proc/self/fd, so
	// the inode is this file even if the name changed meanwhile.
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return errStatus(err)
	}
	if fs.known(&st, out) {
		return fuse.OK
	}
	return fs.adopt(func() (int, error) {
		return unix.Openat(fs.procFD, procName(fd), unix.O_PATH|unix.O_CLOEXEC, 0)
	}, &st, out)
}

// inDir runs f on the directory id for a request naming an entry in it.
func (fs *passthrough) inDir(id uint64, name string, f func(dir *inode) fuse.Status) fuse.Status {
	dir, s := fs.get(id)
	if !s.Ok() {
		return s
	}
	defer fs.put(dir)
	if badName(name) {
		return fuse.EINVAL
	}
	return f(dir)
}

func (fs *passthrough) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return fs.inDir(in.NodeId, name, func(dir *inode) fuse.Status {
		if err := unix.Mkdirat(dir.fd, name, in.Mode&07777); err != nil {
			return errStatus(err)
		}
		return fs.created(dir, name, in.Caller, in.Mode, -1, out)
	})
}

func (fs *passthrough) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	switch in.Mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFIFO, unix.S_IFSOCK, 0:
	default:
		return fuse.EPERM // device nodes would give the guest the host's devices
	}
	return fs.inDir(in.NodeId, name, func(dir *inode) fuse.Status {
		mode := in.Mode &^ (unix.S_ISUID | unix.S_ISGID)
		if err := unix.Mknodat(dir.fd, name, mode, 0); err != nil {
			return errStatus(err)
		}
		return fs.created(dir, name, in.Caller, mode, -1, out)
	})
}

func (fs *passthrough) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	return fs.inDir(h.NodeId, name, func(dir *inode) fuse.Status {
		if err := unix.Symlinkat(target, dir.fd, name); err != nil {
			return errStatus(err)
		}
		return fs.created(dir, name, h.Caller, unix.S_IFLNK, -1, out)
	})
}

func (fs *passthrough) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	n, s := fs.get(in.Oldnodeid)
	if !s.Ok() {
		return s
	}
	defer fs.put(n)
	if n.typ == unix.S_IFDIR {
		return fuse.EPERM
	}
	return fs.inDir(in.NodeId, name, func(dir *inode) fuse.Status {
		// linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH in the initial namespace; the inode's
		// /proc/self/fd entry followed once names the same object (also for a symlink).
		if err := unix.Linkat(fs.procFD, procName(n.fd), dir.fd, name, unix.AT_SYMLINK_FOLLOW); err != nil {
			return errStatus(err)
		}
		return fs.lookupAt(dir, name, out)
	})
}

func (fs *passthrough) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fs.unlink(h.NodeId, name, 0)
}

func (fs *passthrough) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fs.unlink(h.NodeId, name, unix.AT_REMOVEDIR)
}

func (fs *passthrough) unlink(id uint64, name string, flags int) fuse.Status {
	return fs.inDir(id, name, func(dir *inode) fuse.Status {
		return errStatus(unix.Unlinkat(dir.fd, name, flags))
	})
}

func (fs *passthrough) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	if in.Flags&^(unix.RENAME_NOREPLACE|unix.RENAME_EXCHANGE) != 0 {
		return fuse.EINVAL // RENAME_WHITEOUT would make a character device
	}
	from, s := fs.get(in.NodeId)
	if !s.Ok() {
		return s
	}
	defer fs.put(from)
	to, s := fs.get(in.Newdir)
	if !s.Ok() {
		return s
	}
	defer fs.put(to)
	if badName(oldName) || badName(newName) {
		return fuse.EINVAL
	}
	return errStatus(unix.Renameat2(from.fd, oldName, to.fd, newName, uint(in.Flags)))
}

func (fs *passthrough) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	n, s := fs.get(h.NodeId)
	if !s.Ok() {
		return nil, s
	}
	defer fs.put(n)
	if n.typ != unix.S_IFLNK {
		return nil, fuse.EINVAL
	}
	buf := make([]byte, unix.PathMax)
	k, err := unix.Readlinkat(n.fd, "", buf)
	if err != nil {
		return nil, errStatus(err)
	}
	return buf[:k], fuse.OK
}

func (fs *passthrough) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	n, s := fs.get(in.NodeId)
	if !s.Ok() {
		return s
	}
	defer fs.put(n)
	return errStatus(unix.Faccessat2(n.fd, "", in.Mask, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW))
}

func (fs *passthrough) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	n, s := fs.get(h.NodeId)
	if !s.Ok() {
		return s
	}
	defer fs.put(n)
	var st syscall.Statfs_t
	if err := syscall.Fstatfs(n.fd, &st); err != nil {
		return errStatus(err)
	}
	out.FromStatfsT(&st)
	return fuse.OK
}

// openFlags keeps the open(2) flags a guest may pass on: access mode and I/O behaviour, never
// O_CREAT, O_NOFOLLOW (the /proc/self/fd re-open follows exactly one magic link), O_DIRECT
// (guest buffers need not be aligned for the host's device), O_PATH or O_TMPFILE.
func openFlags(f uint32) int {
	return int(f) & (unix.O_ACCMODE | unix.O_APPEND | unix.O_TRUNC | unix.O_NONBLOCK |
		unix.O_SYNC | unix.O_DSYNC | unix.O_NOATIME | unix.O_LARGEFILE)
}

func (fs *passthrough) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n, s := fs.get(in.NodeId)
	if !s.Ok() {
		return s
	}
	defer fs.put(n)
	return fs.open(n, openFlags(in.Flags), out)
}

// open opens an inode the guest named by node ID for I/O and gives it a handle.
func (fs *passthrough) open(n *inode, flags int, out *fuse.OpenOut) fuse.Status {
	switch n.typ {
	case unix.S_IFLNK:
		return fuse.Status(syscall.ELOOP)
	case unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO, unix.S_IFSOCK:
		// A guest kernel keeps FIFOs, sockets and devices on a FUSE mount to itself and never
		// opens them through the daemon; only a hostile guest asks, and a FIFO open would
		// block a daemon thread until some host process opened the other end.
		return fuse.EPERM
	}
	if !fs.reserveFD() {
		return fuse.Status(syscall.EMFILE)
	}
	fd, err := fs.reopen(n, flags)
	if err != nil {
		fs.fds.Add(-1)
		return errStatus(err)
	}
	return fs.addHandle(&fileHandle{fd: fd}, out)
}

func (fs *passthrough) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	return fs.inDir(in.NodeId, name, func(dir *inode) fuse.Status {
		if !fs.reserveFD() {
			return fuse.Status(syscall.EMFILE)
		}
		mode := in.Mode &^ (unix.S_ISUID | unix.S_ISGID)
		flags := openFlags(in.Flags)
		fd, err := unix.Openat(dir.fd, name, flags|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode&07777)
		if err != nil {
			fs.fds.Add(-1)
			if err != unix.EEXIST || in.Flags&unix.O_EXCL != 0 {
				return errStatus(err)
			}
			// The guest had no entry for the name but the host has the file: open what is there
			// like OPEN would (never a symlink or device), and leave its owner and mode alone.
			if st := fs.lookupAt(dir, name, &out.EntryOut); !st.Ok() {
				return st
			}
			n, st := fs.get(out.NodeId)
			if st.Ok() {
				st = fs.open(n, flags, &out.OpenOut)
				fs.put(n)
			}
			if !st.Ok() {
				fs.Forget(out.NodeId, 1)
				out.EntryOut = fuse.EntryOut{}
			}
			return st
		}
		if st := fs.created(dir, name, in.Caller, mode, fd, &out.EntryOut); !st.Ok() {
			unix.Close(fd)
			fs.fds.Add(-1)
			return st
		}
		return fs.addHandle(&fileHandle{fd: fd}, &out.OpenOut)
	})
}

// addHandle files h (holding one descriptor) under a new handle number in out. A session that
// was closed meanwhile gets nothing: the descriptor is closed and the guest gets ESTALE.
func (fs *passthrough) addHandle(h *fileHandle, out *fuse.OpenOut) fuse.Status {
	h.refs.Store(1)
	fs.hmu.Lock()
	if fs.closed.Load() {
		fs.hmu.Unlock()
		fs.putHandle(h)
		return fuse.Status(syscall.ESTALE)
	}
	out.Fh = fs.nextFh
	fs.nextFh++
	fs.handles[out.Fh] = h
	fs.hmu.Unlock()
	if fs.keepCache {
		if h.dir != nil {
			out.OpenFlags |= fuse.FOPEN_CACHE_DIR
		} else {
			out.OpenFlags |= fuse.FOPEN_KEEP_CACHE
		}
	}
	if h.dir == nil && closeIsNoop(h.fd) {
		out.OpenFlags |= fuse.FOPEN_NOFLUSH
	}
	return fuse.OK
}

// closeIsNoop tells whether closing a duplicate of fd, all that Flush does, can do nothing: the
// file lives on a file system without a flush method (checked in Linux's fs/: ext4, XFS, btrfs,
// tmpfs and ramfs have none; NFS, SMB, FUSE, overlayfs, f2fs, ecryptfs and orangefs do), and the
// daemon holds no classic POSIX locks (see setLock), the one other thing close drops. Such files
// are opened with FOPEN_NOFLUSH, so the guest's close(2) costs no FLUSH round trip: one of the
// six requests of each file a guest creates and writes. The guest kernel still flushes for
// writeback-cache mounts (never negotiated here) and writes a shared mapping's dirty pages when
// the mapping goes, as it would without the flag. Any other file system, or a failed fstatfs,
// keeps FLUSH.
func closeIsNoop(fd int) bool {
	var st unix.Statfs_t
	if unix.Fstatfs(fd, &st) != nil {
		return false
	}
	switch uint32(st.Type) {
	case unix.EXT4_SUPER_MAGIC, unix.XFS_SUPER_MAGIC, unix.BTRFS_SUPER_MAGIC, unix.TMPFS_MAGIC, unix.RAMFS_MAGIC:
		return true
	}
	return false
}

// getHandle returns the handle for fh with a reference the caller must put, or nil.
func (fs *passthrough) getHandle(fh uint64) *fileHandle {
	fs.hmu.RLock()
	h := fs.handles[fh]
	if h != nil {
		h.refs.Add(1)
	}
	fs.hmu.RUnlock()
	return h
}

func (fs *passthrough) putHandle(h *fileHandle) {
	if h.refs.Add(-1) == 0 {
		unix.Close(h.fd)
		fs.fds.Add(-1)
	}
}

func (fs *passthrough) releaseHandle(fh uint64) {
	fs.hmu.Lock()
	h := fs.handles[fh]
	delete(fs.handles, fh)
	fs.hmu.Unlock()
	if h != nil {
		fs.putHandle(h)
	}
}

func (fs *passthrough) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) { fs.releaseHandle(in.Fh) }
func (fs *passthrough) ReleaseDir(in *fuse.ReleaseIn)                      { fs.releaseHandle(in.Fh) }

// fileRead is a READ answered by preadv straight into the guest's buffers; it holds its handle
// until the protocol server is done with it.
type fileRead struct {
	fs  *passthrough
	h   *fileHandle
	off int64
	sz  int
}

func (r *fileRead) Size() int { return r.sz }
func (r *fileRead) Done()     { r.fs.putHandle(r.h) }

func (r *fileRead) Bytes(buf []byte) ([]byte, fuse.Status) {
	n, err := unix.Pread(r.h.fd, buf[:min(len(buf), r.sz)], r.off)
	if err != nil {
		return nil, errStatus(err)
	}
	return buf[:n], fuse.OK
}

// Readv is what go-fuse's protocol server calls for a virtio-fs reply (its withReadv interface).
func (r *fileRead) Readv(dst [][]byte) (int, fuse.Status) {
	n, err := preadv(r.h.fd, dst, r.off)
	if err != nil {
		return 0, errStatus(err)
	}
	return n, fuse.OK
}

func (fs *passthrough) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	h := fs.getHandle(in.Fh)
	if h == nil || h.dir != nil {
		if h != nil {
			fs.putHandle(h)
		}
		return nil, fuse.EBADF
	}
	return &fileRead{fs: fs, h: h, off: int64(in.Offset), sz: int(in.Size)}, fuse.OK
}

// Writev answers every WRITE (go-fuse calls Write only when Writev is not implemented).
func (fs *passthrough) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	h := fs.getHandle(in.Fh)
	if h == nil {
		return 0, fuse.EBADF
	}
	defer fs.putHandle(h)
	n, err := pwritev(h.fd, data, int64(in.Offset))
	if err != nil {
		return 0, errStatus(err)
	}
	return uint32(n), fuse.OK
}

// withHandle runs f on fh's descriptor.
func (fs *passthrough) withHandle(fh uint64, f func(fd int) error) fuse.Status {
	h := fs.getHandle(fh)
	if h == nil {
		return fuse.EBADF
	}
	defer fs.putHandle(h)
	return errStatus(f(h.fd))
}

// Flush is close(2) in the guest: closing a duplicate gives file systems that report errors at
// close (NFS, FUSE) their chance, as C virtiofsd does. Locks are OFD locks: closing a dup does
// not drop them.
func (fs *passthrough) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	return fs.withHandle(in.Fh, func(fd int) error {
		d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return err
		}
		return unix.Close(d)
	})
}

func (fs *passthrough) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return fs.withHandle(in.Fh, func(fd int) error {
		if in.FsyncFlags&1 != 0 { // FUSE_FSYNC_FDATASYNC
			return unix.Fdatasync(fd)
		}
		return unix.Fsync(fd)
	})
}

func (fs *passthrough) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return fs.Fsync(cancel, in)
}

func (fs *passthrough) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	return fs.withHandle(in.Fh, func(fd int) error {
		return unix.Fallocate(fd, in.Mode, int64(in.Offset), int64(in.Length))
	})
}

func (fs *passthrough) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	if in.Whence != unix.SEEK_DATA && in.Whence != unix.SEEK_HOLE {
		return fuse.EINVAL // the kernel handles the others itself
	}
	return fs.withHandle(in.Fh, func(fd int) error {
		off, err := unix.Seek(fd, int64(in.Offset), int(in.Whence))
		out.Offset = uint64(off)
		return err
	})
}

func (fs *passthrough) CopyFileRange(cancel <-chan struct{}, in *fuse.CopyFileRangeIn) (uint32, fuse.Status) {
	src := fs.getHandle(in.FhIn)
	if src == nil {
		return 0, fuse.EBADF
	}
	defer fs.putHandle(src)
	dst := fs.getHandle(in.FhOut)
	if dst == nil {
		return 0, fuse.EBADF
	}
	defer fs.putHandle(dst)
	offIn, offOut := int64(in.OffIn), int64(in.OffOut)
	n, err := unix.CopyFileRange(src.fd, &offIn, dst.fd, &offOut, int(min(in.Len, 1<<30)), 0)
	if err != nil {
		return 0, errStatus(err)
	}
	return uint32(n), fuse.OK
}

// Locks: POSIX locks become open-file-description locks on the handle's descriptor (each guest
// open is its own description, so guest processes exclude each other); flock(2) is flock.
func (fs *passthrough) GetLk(cancel <-chan struct{}, in *fuse.LkIn, out *fuse.LkOut) fuse.Status {
	return fs.withHandle(in.Fh, func(fd int) error {
		var flk syscall.Flock_t
		in.Lk.ToFlockT(&flk)
		if err := syscall.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &flk); err != nil {
			return err
		}
		out.Lk.FromFlockT(&flk)
		return nil
	})
}

func (fs *passthrough) SetLk(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	return fs.setLock(in, false)
}

func (fs *passthrough) SetLkw(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	return fs.setLock(in, true)
}

func (fs *passthrough) setLock(in *fuse.LkIn, wait bool) fuse.Status {
	return fs.withHandle(in.Fh, func(fd int) error {
		try := func() error {
			if in.LkFlags&fuse.FUSE_LK_FLOCK != 0 {
				var op int
				switch in.Lk.Typ {
				case syscall.F_RDLCK:
					op = unix.LOCK_SH
				case syscall.F_WRLCK:
					op = unix.LOCK_EX
				case syscall.F_UNLCK:
					op = unix.LOCK_UN
				default:
					return unix.EINVAL
				}
				return unix.Flock(fd, op|unix.LOCK_NB)
			}
			var flk syscall.Flock_t
			in.Lk.ToFlockT(&flk)
			return syscall.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &flk)
		}
		err := try()
		if !wait {
			return err
		}
		// A blocking F_OFD_SETLKW or flock cannot be interrupted (SA_RESTART restarts both), so a
		// guest that goes away while waiting would keep a daemon thread, and the queue's stop,
		// forever. Waiting is a retry with backoff instead, given up when a queue stops or the
		// session closes.
		done := fs.waitDone()
		backoff := time.Millisecond
		for err == unix.EAGAIN || err == unix.EACCES {
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-done:
				t.Stop()
				return unix.EINTR
			}
			backoff = min(2*backoff, lockPollMax)
			err = try()
		}
		return err
	})
}

// waitDone is closed when the lock waits running now must give up.
func (fs *passthrough) waitDone() <-chan struct{} {
	fs.wmu.Lock()
	defer fs.wmu.Unlock()
	return fs.waitCancel
}

// cancelWaits makes the lock waits running now fail with EINTR: a queue is stopping (the VMM
// paused, reset or went away) and must not wait for a lock another program may never release.
func (fs *passthrough) cancelWaits() {
	fs.wmu.Lock()
	defer fs.wmu.Unlock()
	if !fs.closed.Load() {
		close(fs.waitCancel)
		fs.waitCancel = make(chan struct{})
	}
}

// lockPollMax bounds how long a lock waiter sleeps between tries.
const lockPollMax = 20 * time.Millisecond

// xattrFD opens an inode for an xattr call: the *at xattr calls are newer than Linux 6.1 and the
// path ones would need /proc mounted in the sandbox. Only files and directories qualify.
func (fs *passthrough) xattrFD(id uint64) (int, fuse.Status) {
	n, s := fs.get(id)
	if !s.Ok() {
		return -1, s
	}
	defer fs.put(n)
	if n.typ != unix.S_IFREG && n.typ != unix.S_IFDIR {
		return -1, fuse.Status(syscall.ENOTSUP)
	}
	fd, err := fs.reopen(n, unix.O_RDONLY|unix.O_NONBLOCK)
	if err != nil {
		return -1, errStatus(err)
	}
	return fd, fuse.OK
}

// xattrReply is an xattr call's answer in go-fuse's terms: when the guest's buffer was too small
// it gets ERANGE with the size it needs (size asks for it).
func xattrReply(n int, err error, size func() (int, error)) (uint32, fuse.Status) {
	if err == unix.ERANGE {
		if n, err = size(); err == nil {
			return uint32(n), fuse.ERANGE
		}
	}
	return uint32(max(n, 0)), errStatus(err)
}

func (fs *passthrough) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	fd, s := fs.xattrFD(h.NodeId)
	if !s.Ok() {
		return 0, s
	}
	defer unix.Close(fd)
	n, err := unix.Fgetxattr(fd, attr, dest)
	return xattrReply(n, err, func() (int, error) { return unix.Fgetxattr(fd, attr, nil) })
}

func (fs *passthrough) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	fd, s := fs.xattrFD(h.NodeId)
	if !s.Ok() {
		return 0, s
	}
	defer unix.Close(fd)
	n, err := unix.Flistxattr(fd, dest)
	return xattrReply(n, err, func() (int, error) { return unix.Flistxattr(fd, nil) })
}

func (fs *passthrough) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	fd, s := fs.xattrFD(in.NodeId)
	if !s.Ok() {
		return s
	}
	defer unix.Close(fd)
	return errStatus(unix.Fsetxattr(fd, attr, data, int(in.Flags)))
}

func (fs *passthrough) RemoveXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string) fuse.Status {
	fd, s := fs.xattrFD(h.NodeId)
	if !s.Ok() {
		return s
	}
	defer unix.Close(fd)
	return errStatus(unix.Fremovexattr(fd, attr))
}
