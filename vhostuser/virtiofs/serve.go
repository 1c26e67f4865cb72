package virtiofs

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/vhostuser"
)

// Cache policies (--cache).
const (
	CacheAuto   = "auto"   // attributes and entries trusted for 1 s
	CacheAlways = "always" // trusted for a day: the host does not change the share behind the guest
	CacheNever  = "never"  // nothing cached: every access asks the daemon
)

// Config configures a virtio-fs backend.
type Config struct {
	// Socket is the vhost-user socket to listen on (ignored when Listener is set).
	Socket string
	// Listener, when set, is used instead of listening on Socket (the sandboxed child inherits
	// its parent's listener).
	Listener *net.UnixListener
	// SharedDir is the directory the guest sees.
	SharedDir string
	ReadOnly  bool
	// Trace logs every FUSE request and reply (go-fuse's debug output) to Logger.
	Trace bool
	// Cache is CacheAuto (default), CacheAlways or CacheNever.
	Cache string
	// Xattr enables extended attributes.
	Xattr bool
	// RequestQueues is the number of request queues (default 1); the VMM must use the same.
	RequestQueues int
	// Workers bounds the requests in flight per queue (default 32).
	Workers int
	Logger  zerolog.Logger

	// wrap, in tests, wraps the file system (to make a request block on cue).
	wrap func(fuse.RawFileSystem) fuse.RawFileSystem
	// takeover, in tests, replaces the watchdog's tick (to take it out of the picture).
	takeover time.Duration
}

func (c *Config) check() error {
	switch c.Cache {
	case "":
		c.Cache = CacheAuto
	case CacheAuto, CacheAlways, CacheNever:
	default:
		return fmt.Errorf("virtiofs: cache %q: want auto, always or never", c.Cache)
	}
	if c.RequestQueues == 0 {
		c.RequestQueues = 1
	}
	if c.RequestQueues < 1 || c.RequestQueues > 64 {
		return fmt.Errorf("virtiofs: %d request queues: want 1..64", c.RequestQueues)
	}
	if c.Workers == 0 {
		c.Workers = 32
	}
	if c.SharedDir == "" {
		return errors.New("virtiofs: SharedDir is required")
	}
	st, err := os.Stat(c.SharedDir)
	if err != nil {
		return fmt.Errorf("virtiofs: shared dir: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("virtiofs: shared dir %s is not a directory", c.SharedDir)
	}
	if c.Listener == nil && c.Socket == "" {
		return errors.New("virtiofs: Socket or Listener is required")
	}
	return nil
}

// session is one FUSE session: the protocol server and the file system under it. A guest that
// re-initialises gets a new one; close releases the old one's descriptors.
type session struct {
	ps    *fuse.ProtocolServer
	raw   fuse.RawFileSystem // what ps serves: the guarded fs
	fs    *passthrough
	trace bool        // every request goes through go-fuse, which logs it
	fast  atomic.Bool // FUSE_INIT succeeded: the fast path may answer
}

// handle answers one request, on fp's fast path when it can (fp nil: through go-fuse only).
func (s *session) handle(fp *fastPath, in, out [][]byte) (int, fuse.Status) {
	if fp != nil && s.fast.Load() {
		if n, ok := fp.serve(s.raw, in, out); ok {
			return n, fuse.OK
		}
	}
	n, st := s.ps.HandleRequest(in, out)
	if !s.trace && st.Ok() && !s.fast.Load() && initOK(in, out, n) {
		s.fast.Store(true)
	}
	return n, st
}

// initOK reports a FUSE_INIT request that go-fuse answered with success.
func initOK(in, out [][]byte, n int) bool {
	var oh [outHeaderSize]byte
	if n < outHeaderSize || opcode(in) != opInit || vhostuser.Gather(oh[:], out, 0) < len(oh) {
		return false
	}
	return binary.LittleEndian.Uint32(oh[4:]) == 0
}

func (s *session) close() { s.fs.close() }

// newSession builds the guarded pass-through FUSE server for cfg.SharedDir.
func newSession(cfg Config) (*session, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	var ttl time.Duration
	switch cfg.Cache {
	case CacheAuto:
		ttl = time.Second
	case CacheAlways:
		ttl = 24 * time.Hour
	}
	pfs, err := newPassthrough(cfg.SharedDir, ttl, cfg.Cache == CacheAlways)
	if err != nil {
		return nil, fmt.Errorf("virtiofs: %w", err)
	}
	opts := fuse.MountOptions{
		MaxWrite:                 1 << 20,
		MaxReadAhead:             1 << 20,
		DisableXAttrs:            !cfg.Xattr,
		EnableLocks:              true,
		ExplicitDataCacheControl: cfg.Cache == CacheNever,
		Logger:                   log.New(cfg.Logger, "go-fuse: ", 0),
		Debug:                    cfg.Trace,
		PanicHandler: func(r any) fuse.Status {
			cfg.Logger.Error().Interface("panic", r).Msg("virtiofs: request handler panicked")
			return fuse.EIO
		},
	}
	var raw fuse.RawFileSystem = &guard{RawFileSystem: pfs, readOnly: cfg.ReadOnly, xattr: cfg.Xattr, directIO: cfg.Cache == CacheNever}
	if cfg.wrap != nil {
		raw = cfg.wrap(raw)
	}
	return &session{ps: fuse.NewProtocolServer(raw, &opts), raw: raw, fs: pfs, trace: cfg.Trace}, nil
}

// Server is a running virtio-fs backend.
type Server struct {
	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

// Serve starts serving cfg.SharedDir on cfg.Socket (or cfg.Listener) in this process, without a
// sandbox: use it for trusted guests and tests, and the `virtkit virtiofsd` command (which
// sandboxes itself) for everything else.
func Serve(ctx context.Context, cfg Config) (*Server, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	l := cfg.Listener
	created := ""
	if l == nil {
		var err error
		if l, err = Listen(cfg.Socket); err != nil {
			return nil, err
		}
		created = cfg.Socket
	}
	raiseNoFile()
	dev := &device{
		log: cfg.Logger, nq: 1 + cfg.RequestQueues, workers: cfg.Workers,
		newSession: func() (*session, error) { return newSession(cfg) },
		takeover:   cmp.Or(cfg.takeover, takeover),
	}
	ctx, cancel := context.WithCancel(ctx)
	s := &Server{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		s.err = vhostuser.Serve(ctx, l, dev, cfg.Logger)
		dev.Reset()
		if created != "" {
			os.Remove(created)
		}
	}()
	return s, nil
}

// Close stops the server and waits for it.
func (s *Server) Close() error {
	s.cancel()
	return s.Wait()
}

// Wait blocks until the server stops and returns why.
func (s *Server) Wait() error {
	<-s.done
	return s.err
}

// Listen creates the vhost-user socket (see vhostuser.Listen: connectable as soon as it exists;
// the caller removes it when done).
func Listen(path string) (*net.UnixListener, error) {
	l, err := vhostuser.Listen(path)
	if err != nil {
		return nil, fmt.Errorf("virtiofs: %w", err)
	}
	return l, nil
}

// raiseNoFile lifts the soft fd limit to the hard one: guests open many files, and running out
// must mean EMFILE for the guest, which the hard limit still bounds.
func raiseNoFile() {
	var r syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r) == nil && r.Cur < r.Max {
		r.Cur = r.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
	}
}
