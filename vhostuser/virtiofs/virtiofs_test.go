package virtiofs

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/vhostuser/vhostusertest"
)

const root = 1 // FUSE_ROOT_ID

func testLogger(t testing.TB) zerolog.Logger {
	return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
}

// inProcess serves share from this process (no sandbox) and returns a FUSE client on it.
func inProcess(t testing.TB, share string, mod func(*Config)) *vhostusertest.FUSE {
	t.Helper()
	_, c := inProcessServer(t, share, mod)
	return c
}

// inProcessServer is inProcess that also returns the server, for tests that stop it themselves.
func inProcessServer(t testing.TB, share string, mod func(*Config)) (*Server, *vhostusertest.FUSE) {
	t.Helper()
	cfg := Config{Socket: filepath.Join(t.TempDir(), "fs.sock"), SharedDir: share, Logger: testLogger(t)}
	if mod != nil {
		mod(&cfg)
	}
	s, err := Serve(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, client(t, cfg.Socket)
}

// stopWithin stops s and fails the test, saying what was waiting, when that takes longer than d.
func stopWithin(t testing.TB, s *Server, d time.Duration, waiting string) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("the daemon did not stop while %s", waiting)
	}
}

func client(t testing.TB, sock string) *vhostusertest.FUSE {
	t.Helper()
	f, err := vhostusertest.Dial(sock, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	c, err := vhostusertest.NewFUSE(f, 256)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func isErrno(err error, e syscall.Errno) bool {
	var fe vhostusertest.Errno
	return errors.As(err, &fe) && syscall.Errno(fe) == e
}

// TestFUSEOps drives the usual file operations through the virtqueue, with requests laid out
// as two descriptors and as a Linux guest lays them out (file data in scattered pages).
func TestFUSEOps(t *testing.T) {
	for _, pages := range []bool{false, true} {
		t.Run(fmt.Sprintf("pages=%v", pages), func(t *testing.T) { testFUSEOps(t, pages) })
	}
}

func testFUSEOps(t *testing.T, pages bool) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "hello.txt"), []byte("hello"), 0o644)
	c := inProcess(t, share, nil)
	c.Pages = pages
	e, err := c.Lookup(root, "hello.txt")
	if err != nil {
		t.Fatal(err)
	}
	if e.Attr.Size != 5 {
		t.Fatalf("size %d", e.Attr.Size)
	}
	fh, err := c.Open(e.NodeID, uint32(os.O_RDONLY))
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Read(e.NodeID, fh, 0, 4096)
	if err != nil || string(b) != "hello" {
		t.Fatalf("read %q %v", b, err)
	}
	c.Release(e.NodeID, fh)

	d, err := c.Mkdir(root, "dir", 0o755)
	if err != nil {
		t.Fatal(err)
	}
	f, fh, err := c.Create(d.NodeID, "big", uint32(os.O_RDWR), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20)
	rand.Read(data)
	if n, err := c.Write(f.NodeID, fh, 0, data); err != nil || n != uint32(len(data)) {
		t.Fatalf("write %d %v", n, err)
	}
	got, err := c.Read(f.NodeID, fh, 0, 1<<20)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back %d bytes %v", len(got), err)
	}
	// Part pages: 4097 bytes from offset 1 (with Pages, a full page and one byte of another).
	if got, err = c.ReadInto(got, f.NodeID, fh, 1, 4097); err != nil || !bytes.Equal(got, data[1:4098]) {
		t.Fatalf("read of 4097 bytes at 1: %d bytes %v", len(got), err)
	}
	if n, err := c.Write(f.NodeID, fh, 3, data[:5000]); err != nil || n != 5000 {
		t.Fatalf("write of 5000 bytes at 3: %d %v", n, err)
	}
	copy(data[3:], data[:5000])
	c.Release(f.NodeID, fh)
	onHost, _ := os.ReadFile(filepath.Join(share, "dir", "big"))
	if !bytes.Equal(onHost, data) {
		t.Fatal("host file differs from what the guest wrote")
	}
	if _, err := c.Symlink(d.NodeID, "s", "big"); err != nil {
		t.Fatal(err)
	}
	l, err := c.Lookup(d.NodeID, "s")
	if err != nil {
		t.Fatal(err)
	}
	if tgt, err := c.Readlink(l.NodeID); err != nil || tgt != "big" {
		t.Fatalf("readlink %q %v", tgt, err)
	}
	if _, err := c.Link(f.NodeID, root, "hard"); err != nil {
		t.Fatal(err)
	}
	if a, err := c.Getattr(f.NodeID); err != nil || a.Nlink != 2 {
		t.Fatalf("nlink %+v %v", a, err)
	}
	if err := c.Rename(d.NodeID, "big", root, "moved"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(share, "moved")); err != nil {
		t.Fatal(err)
	}
	if err := c.Unlink(root, "moved"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Lookup(root, "moved"); !isErrno(err, syscall.ENOENT) {
		t.Fatalf("lookup after unlink: %v", err)
	}
	if err := c.Forget(l.NodeID, 1); err != nil {
		t.Fatal(err)
	}
}

// TestGuardRefusesHostileNames covers what the guard refuses in every sandbox mode.
func TestGuardRefusesHostileNames(t *testing.T) {
	share := t.TempDir()
	c := inProcess(t, share, nil)
	for _, name := range []string{"..", ".", "../etc", "a/b", ""} {
		if _, err := c.Lookup(root, name); err == nil {
			t.Errorf("LOOKUP %q succeeded", name)
		}
		if _, err := c.Mkdir(root, name, 0o755); err == nil {
			t.Errorf("MKDIR %q succeeded", name)
		}
	}
	if _, err := c.Mknod(root, "null", syscall.S_IFCHR|0o666, 1<<8|3); !isErrno(err, syscall.EPERM) {
		t.Errorf("MKNOD of a character device: %v, want EPERM", err)
	}
	if _, err := c.Mknod(root, "sda", syscall.S_IFBLK|0o666, 8<<8); !isErrno(err, syscall.EPERM) {
		t.Errorf("MKNOD of a block device: %v, want EPERM", err)
	}
	if _, err := c.Mknod(root, "fifo", syscall.S_IFIFO|0o644, 0); err != nil {
		t.Errorf("MKNOD of a fifo: %v", err)
	}
	// Node IDs the daemon never handed out fail cleanly.
	if _, err := c.Getattr(0xdeadbeef); err == nil {
		t.Error("GETATTR on a forged node id succeeded")
	}
	if _, err := c.Link(0xdeadbeef, root, "x"); err == nil {
		t.Error("LINK from a forged node id succeeded")
	}
	if _, err := c.Getattr(root); err != nil {
		t.Fatalf("daemon unhealthy after hostile requests: %v", err)
	}
}

func TestReadOnly(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("x"), 0o644)
	c := inProcess(t, share, func(c *Config) { c.ReadOnly = true })
	e, err := c.Lookup(root, "f")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Open(e.NodeID, uint32(os.O_RDWR)); !isErrno(err, syscall.EROFS) {
		t.Errorf("open rw: %v", err)
	}
	if _, _, err := c.Create(root, "n", uint32(os.O_RDWR), 0o644); !isErrno(err, syscall.EROFS) {
		t.Errorf("create: %v", err)
	}
	if err := c.Unlink(root, "f"); !isErrno(err, syscall.EROFS) {
		t.Errorf("unlink: %v", err)
	}
	if _, err := c.Mkdir(root, "d", 0o755); !isErrno(err, syscall.EROFS) {
		t.Errorf("mkdir: %v", err)
	}
	fh, err := c.Open(e.NodeID, uint32(os.O_RDONLY))
	if err != nil {
		t.Fatal(err)
	}
	if b, err := c.Read(e.NodeID, fh, 0, 10); err != nil || string(b) != "x" {
		t.Fatalf("read %q %v", b, err)
	}
}

// TestSandboxStopsEscapes runs the real daemon (sandboxed) and tries to leave the share the
// ways a hostile guest would. Each attempt must fail.
func TestSandboxStopsEscapes(t *testing.T) {
	cmdtest.RequireRoot(t)
	share := t.TempDir()
	os.Mkdir(filepath.Join(share, "d"), 0o755)
	os.WriteFile(filepath.Join(share, "f"), []byte("inside"), 0o644)
	// A device node placed in the share by someone on the host must not open (nodev).
	if err := syscall.Mknod(filepath.Join(share, "hostnull"), syscall.S_IFCHR|0o666, 1<<8|3); err != nil {
		t.Fatal(err)
	}
	sock := startDaemon(t, share)
	c := client(t, sock)

	d, err := c.Lookup(root, "d")
	if err != nil {
		t.Fatal(err)
	}
	f, err := c.Lookup(root, "f")
	if err != nil {
		t.Fatal(err)
	}
	// Swap the directory for a symlink to /etc and the file for a symlink to /etc/passwd behind
	// the daemon's back (another guest on the share, or a race between LOOKUP and use).
	os.Rename(filepath.Join(share, "d"), filepath.Join(share, "d.old"))
	os.Symlink("/etc", filepath.Join(share, "d"))
	os.Rename(filepath.Join(share, "f"), filepath.Join(share, "f.old"))
	os.Symlink("/etc/passwd", filepath.Join(share, "f"))

	if e, err := c.Lookup(d.NodeID, "passwd"); err == nil {
		fh, oerr := c.Open(e.NodeID, uint32(os.O_RDONLY))
		if oerr == nil {
			b, _ := c.Read(e.NodeID, fh, 0, 4096)
			t.Fatalf("escaped through a swapped directory: read %q", b)
		}
	}
	if fh, err := c.Open(f.NodeID, uint32(os.O_RDONLY)); err == nil {
		b, _ := c.Read(f.NodeID, fh, 0, 4096)
		if bytes.Contains(b, []byte("root:")) {
			t.Fatalf("escaped through a swapped file: read %q", b)
		}
	}
	// Absolute symlinks the guest makes resolve inside the share when the daemon follows them.
	if _, err := c.Symlink(root, "abs", "/etc/passwd"); err != nil {
		t.Fatal(err)
	}
	if e, err := c.Lookup(root, "abs"); err == nil {
		if fh, err := c.Open(e.NodeID, uint32(os.O_RDONLY)); err == nil {
			b, _ := c.Read(e.NodeID, fh, 0, 4096)
			t.Fatalf("opened an absolute symlink to a host file: %q", b)
		}
	}
	// Hard links to the swapped nodes must not reach host files either.
	if e, err := c.Lookup(d.NodeID, "shadow"); err == nil {
		if _, err := c.Link(e.NodeID, root, "stolen"); err == nil {
			t.Fatal("hard-linked a host file into the share")
		}
	}
	if _, err := os.Lstat(filepath.Join(share, "stolen")); err == nil {
		t.Fatal("a link named stolen appeared in the share")
	}
	hn, err := c.Lookup(root, "hostnull")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Open(hn.NodeID, uint32(os.O_RDWR)); err == nil {
		t.Fatal("opened a device node through the share")
	}
	// Creating files through a swapped directory lands inside the share or fails.
	if _, _, err := c.Create(d.NodeID, "planted", uint32(os.O_RDWR), 0o644); err == nil {
		if _, err := os.Stat("/etc/planted"); err == nil {
			os.Remove("/etc/planted")
			t.Fatal("created /etc/planted on the host")
		}
	}
	if _, err := os.Stat("/etc/planted"); err == nil {
		os.Remove("/etc/planted")
		t.Fatal("created /etc/planted on the host")
	}
}

// TestFDExhaustion opens far more files than the daemon's fd limit: the guest gets errors, the
// daemon survives and recovers when files are released.
func TestFDExhaustion(t *testing.T) {
	cmdtest.RequireRoot(t)
	prlimit := cmdtest.Tool(t, "prlimit")
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("x"), 0o644)
	sock := startDaemonWith(t, share, []string{prlimit, "--nofile=200:200", "--"})
	c := client(t, sock)
	e, err := c.Lookup(root, "f")
	if err != nil {
		t.Fatal(err)
	}
	var fhs []uint64
	failed := false
	for i := 0; i < 400; i++ {
		fh, err := c.Open(e.NodeID, uint32(os.O_RDONLY))
		if err != nil {
			failed = true
			break
		}
		fhs = append(fhs, fh)
	}
	if !failed {
		t.Fatal("400 opens under a 200-fd limit all succeeded")
	}
	if _, err := c.Getattr(e.NodeID); err != nil {
		t.Fatalf("daemon unhealthy at the fd limit: %v", err)
	}
	for _, fh := range fhs {
		c.Release(e.NodeID, fh)
	}
	fh, err := c.Open(e.NodeID, uint32(os.O_RDONLY))
	if err != nil {
		t.Fatalf("open after releasing: %v", err)
	}
	c.Release(e.NodeID, fh)
}

// TestSandboxRootless runs the daemon as an unprivileged user: it sandboxes itself in a user and
// mount namespace, serves the share, and files it creates belong to that user on the host.
func TestSandboxRootless(t *testing.T) {
	cmdtest.RequireRoot(t) // to switch to the unprivileged user
	setpriv := cmdtest.Tool(t, "setpriv")
	const nobody = 65534
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(dir), 0o755) // t.TempDir makes its parent 0700
	bin := filepath.Join(dir, "virtkit")
	b, err := os.ReadFile(cmdtest.Binary(t, "virtkit"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(bin, b, 0o755)
	share, run := filepath.Join(dir, "share"), filepath.Join(dir, "run")
	for _, d := range []string{share, run} {
		os.Mkdir(d, 0o755)
		os.Chown(d, nobody, nobody)
	}
	os.Mkdir(filepath.Join(share, "d"), 0o755)
	os.Chown(filepath.Join(share, "d"), nobody, nobody)
	sock := filepath.Join(run, "fs.sock")
	cmd := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
		bin, "virtiofsd", "--socket-path", sock, "--shared-dir", share, "--log-level", "warn", "--state-dir", filepath.Join(run, "state"))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := client(t, sock)
	d, err := c.Lookup(root, "d")
	if err != nil {
		t.Fatal(err)
	}
	f, fh, err := c.Create(d.NodeID, "new", uint32(os.O_RDWR), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	c.Write(f.NodeID, fh, 0, []byte("rootless"))
	c.Release(f.NodeID, fh)
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(share, "d", "new"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Uid != nobody {
		t.Fatalf("file created by the rootless daemon belongs to uid %d, want %d", st.Uid, nobody)
	}
	// The same directory swap as TestSandboxStopsEscapes.
	os.Rename(filepath.Join(share, "d"), filepath.Join(share, "d.old"))
	os.Symlink("/etc", filepath.Join(share, "d"))
	if e, err := c.Lookup(d.NodeID, "passwd"); err == nil {
		if fh, err := c.Open(e.NodeID, uint32(os.O_RDONLY)); err == nil {
			b, _ := c.Read(e.NodeID, fh, 0, 4096)
			t.Fatalf("rootless daemon escaped the share: %q", b)
		}
	}
}

// TestReinitStartsFreshSession: a guest that reboots sends FUSE_INIT again on the same vhost-user
// connection; it gets a working fresh session.
func TestReinitStartsFreshSession(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("x"), 0o644)
	c := inProcess(t, share, nil)
	if _, err := c.Lookup(root, "f"); err != nil {
		t.Fatal(err)
	}
	in := make([]byte, 16)
	binary.LittleEndian.PutUint32(in, 7)
	binary.LittleEndian.PutUint32(in[4:], 31)
	if _, err := c.Do(vhostusertest.OpInit, 0, in, 80); err != nil {
		t.Fatalf("second FUSE_INIT: %v", err)
	}
	e, err := c.Lookup(root, "f")
	if err != nil {
		t.Fatal(err)
	}
	if a, err := c.Getattr(e.NodeID); err != nil || a.Size != 1 {
		t.Fatalf("getattr after re-init: %+v %v", a, err)
	}
}

// TestFrontendReconnect: after a VMM goes away the daemon serves the next one.
func TestFrontendReconnect(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("x"), 0o644)
	sock := filepath.Join(t.TempDir(), "fs.sock")
	s, err := Serve(context.Background(), Config{Socket: sock, SharedDir: share, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := 0; i < 3; i++ {
		f, err := vhostusertest.Dial(sock, 16<<20)
		if err != nil {
			t.Fatal(err)
		}
		c, err := vhostusertest.NewFUSE(f, 64)
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		if _, err := c.Lookup(root, "f"); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		f.Close()
	}
}

func TestCacheNeverOpensDirect(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("x"), 0o644)
	c := inProcess(t, share, func(c *Config) { c.Cache = CacheNever })
	e, err := c.Lookup(root, "f")
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Do(vhostusertest.OpOpen, e.NodeID, make([]byte, 8), 16)
	if err != nil || len(b) < 16 {
		t.Fatalf("open: %v", err)
	}
	const directIO = 1 // FOPEN_DIRECT_IO
	if binary.LittleEndian.Uint32(b[8:])&directIO == 0 {
		t.Fatalf("open flags %#x lack FOPEN_DIRECT_IO", binary.LittleEndian.Uint32(b[8:]))
	}
}

// blockingFS makes GETATTR of one node wait until release is closed: an ordinary request that
// happens to take long (a slow or hung mount under the share).
type blockingFS struct {
	fuse.RawFileSystem
	node    uint64
	release chan struct{}
}

func (b *blockingFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if in.NodeId == b.node {
		<-b.release
	}
	return b.RawFileSystem.GetAttr(cancel, in, out)
}

// TestBlockedRequestDoesNotStallQueue: a request that blocks inline hands the queue to a new
// popping goroutine (the watchdog); requests behind it are answered, and it completes later.
func TestBlockedRequestDoesNotStallQueue(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("x"), 0o644)
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	c := inProcess(t, share, func(c *Config) {
		c.wrap = func(fs fuse.RawFileSystem) fuse.RawFileSystem {
			return &blockingFS{RawFileSystem: fs, node: 2, release: release}
		}
	})
	t.Cleanup(unblock) // runs before the server stops, whatever happens
	e, err := c.Lookup(root, "f")
	if err != nil || e.NodeID != 2 {
		t.Fatalf("lookup: %+v %v", e, err)
	}
	head, err := c.Submit(vhostusertest.OpGetattr, e.NodeID, make([]byte, 16), 104)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if _, err := c.Getattr(root); err != nil {
			t.Fatalf("getattr behind a blocked request: %v", err)
		}
	}
	unblock()
	used, err := c.WaitAny(10 * time.Second)
	if err != nil || len(used) != 1 || used[0].Head != head {
		t.Fatalf("blocked request did not complete: %v %v", used, err)
	}
}

// lkIn is a LkIn body locking all of a file for fh (the owner is the handle too).
func lkIn(fh uint64, typ uint32) []byte {
	b := make([]byte, 48) // fh, owner, start, end, type, pid, lk_flags, padding
	binary.LittleEndian.PutUint64(b, fh)
	binary.LittleEndian.PutUint64(b[8:], fh)
	binary.LittleEndian.PutUint64(b[24:], 1<<63-1)
	binary.LittleEndian.PutUint32(b[32:], typ)
	return b
}

// TestStopEndsLockWait: a guest waiting for a lock that is never released does not keep the
// daemon from stopping (the VMM went away, or paused the device).
func TestStopEndsLockWait(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("x"), 0o644)
	holder, err := os.OpenFile(filepath.Join(share, "f"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	flk := syscall.Flock_t{Type: syscall.F_WRLCK}
	if err := syscall.FcntlFlock(holder.Fd(), unix.F_OFD_SETLK, &flk); err != nil {
		t.Fatal(err)
	}
	s, c := inProcessServer(t, share, nil)
	e, err := c.Lookup(root, "f")
	if err != nil {
		t.Fatal(err)
	}
	fh, err := c.Open(e.NodeID, uint32(os.O_RDWR))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Submit(opSetlkw, e.NodeID, lkIn(fh, syscall.F_WRLCK), 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // let the wait begin
	stopWithin(t, s, 20*time.Second, "a guest waited for a lock")
}

// TestLockWaitDoesNotStallQueue: a SETLKW that waits for a lock another open holds does not hold
// up the queue: the unlock sent behind it is answered, and then the waiter gets the lock.
func TestLockWaitDoesNotStallQueue(t *testing.T) {
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "f"), []byte("x"), 0o644)
	// Without the watchdog only the SETLKW's own goroutine can let the unlock through.
	c := inProcess(t, share, func(c *Config) { c.takeover = time.Hour })
	e, err := c.Lookup(root, "f")
	if err != nil {
		t.Fatal(err)
	}
	fh1, err := c.Open(e.NodeID, uint32(os.O_RDWR))
	if err != nil {
		t.Fatal(err)
	}
	fh2, err := c.Open(e.NodeID, uint32(os.O_RDWR))
	if err != nil {
		t.Fatal(err)
	}
	const opGetlk, opSetlk = 31, 32
	lk := lkIn
	if _, err := c.Do(opSetlk, e.NodeID, lk(fh1, syscall.F_WRLCK), 0); err != nil {
		t.Fatalf("setlk: %v", err)
	}
	if _, err := c.Do(opSetlk, e.NodeID, lk(fh2, syscall.F_WRLCK), 0); !isErrno(err, syscall.EAGAIN) {
		t.Fatalf("conflicting setlk: %v, want EAGAIN", err)
	}
	wait, err := c.Submit(opSetlkw, e.NodeID, lk(fh2, syscall.F_WRLCK), 0)
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := c.Submit(opSetlk, e.NodeID, lk(fh1, syscall.F_UNLCK), 0)
	if err != nil {
		t.Fatal(err)
	}
	pending := map[uint16]bool{wait: true, unlock: true}
	for len(pending) > 0 {
		used, err := c.WaitAny(10 * time.Second)
		if err != nil {
			t.Fatalf("waiting for the lock hand-over (%d left): %v", len(pending), err)
		}
		for _, u := range used {
			delete(pending, u.Head)
		}
	}
	// fh2 now holds the lock: fh1 sees it.
	b, err := c.Do(opGetlk, e.NodeID, lk(fh1, syscall.F_WRLCK), 24)
	if err != nil || len(b) < 24 || binary.LittleEndian.Uint32(b[16:]) != syscall.F_WRLCK {
		t.Fatalf("getlk after the hand-over: %x %v", b, err)
	}
}

// TestNoFlushOnLocalFS: files on a file system whose close cannot report anything (tmpfs here)
// are opened with FOPEN_NOFLUSH, by OPEN and CREATE alike, so the guest's close(2) costs no
// FLUSH round trip; files on any other file system (procfs here) keep FLUSH.
func TestNoFlushOnLocalFS(t *testing.T) {
	const noFlush = 1 << 5 // FOPEN_NOFLUSH
	openFlags := func(c *vhostusertest.FUSE, node uint64) uint32 {
		t.Helper()
		b, err := c.Do(vhostusertest.OpOpen, node, make([]byte, 8), 16)
		if err != nil || len(b) < 16 {
			t.Fatalf("open: %v", err)
		}
		return binary.LittleEndian.Uint32(b[8:])
	}

	shm, err := os.MkdirTemp("/dev/shm", "vk-noflush-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	os.WriteFile(filepath.Join(shm, "f"), []byte("x"), 0o644)
	c := inProcess(t, shm, nil)
	e, err := c.Lookup(root, "f")
	if err != nil {
		t.Fatal(err)
	}
	if f := openFlags(c, e.NodeID); f&noFlush == 0 {
		t.Errorf("OPEN of a tmpfs file: flags %#x lack FOPEN_NOFLUSH", f)
	}
	in := make([]byte, 16) // fuse_create_in: flags, mode, umask, open_flags
	binary.LittleEndian.PutUint32(in[0:], uint32(os.O_RDWR))
	binary.LittleEndian.PutUint32(in[4:], 0o644)
	b, err := c.DoParts(vhostusertest.OpCreate, root, [][]byte{in, []byte("g\x00")}, vhostusertest.EntryOutSize+16)
	if err != nil || len(b) < vhostusertest.EntryOutSize+16 {
		t.Fatalf("create: %v", err)
	}
	if f := binary.LittleEndian.Uint32(b[vhostusertest.EntryOutSize+8:]); f&noFlush == 0 {
		t.Errorf("CREATE on tmpfs: flags %#x lack FOPEN_NOFLUSH", f)
	}

	c = inProcess(t, "/proc/sys/kernel", nil)
	e, err = c.Lookup(root, "ostype")
	if err != nil {
		t.Fatal(err)
	}
	if f := openFlags(c, e.NodeID); f&noFlush != 0 {
		t.Errorf("OPEN of a procfs file: flags %#x have FOPEN_NOFLUSH", f)
	}
}

// TestOpNames: the request counts logRequests prints name the opcodes right.
func TestOpNames(t *testing.T) {
	for op, want := range map[uint32]string{
		vhostusertest.OpLookup: "LOOKUP", vhostusertest.OpGetattr: "GETATTR", vhostusertest.OpOpen: "OPEN",
		vhostusertest.OpRelease: "RELEASE", opFlush: "FLUSH", opInit: "INIT", vhostusertest.OpOpendir: "OPENDIR",
		vhostusertest.OpReleasedir: "RELEASEDIR", opSetlkw: "SETLKW", vhostusertest.OpCreate: "CREATE",
		opFallocate: "FALLOCATE", opCopyFileRange: "COPY_FILE_RANGE", 52: "STATX", 53: "other", 4096: "other",
	} {
		if got := opName(op); got != want {
			t.Errorf("opName(%d) = %q, want %q", op, got, want)
		}
	}
}

// TestParkedQueueAnswers: a queue the guest left quiet for longer than idleAfter waits parked in
// the netpoller; the next request is answered, and stopping the daemon ends the parked wait.
func TestParkedQueueAnswers(t *testing.T) {
	s, c := inProcessServer(t, t.TempDir(), nil)
	for i := 0; i < 3; i++ {
		if _, err := c.Getattr(root); err != nil {
			t.Fatalf("getattr %d: %v", i, err)
		}
		time.Sleep(idleAfter + 150*time.Millisecond) // the popper parks
	}
	stopWithin(t, s, 10*time.Second, "its queues waited parked")
}
