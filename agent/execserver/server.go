// Package execserver is the guest side of the agent protocol (agent/proto): it accepts
// connections on any net.Listener (vsock, hybrid vsock, unix, tcp — see agent/addr) and runs
// exec sessions, ping/info, file copies, port forwards and shutdown requests.
//
// Each connection starts with a hello exchange. A connection whose first request is Ping, Info,
// Wait or Shutdown stays a control connection and may carry many of those; Exec, CopyIn, CopyOut
// and Forward dedicate the connection to that one operation. So every session has its own
// transport-level flow control: a client that stops reading blocks only its own session's
// process (its pipe fills), and the agent never buffers output without bound. Stdin uses explicit
// credit (proto.StdinWindow) so signals and resizes are never stuck behind unread input.
//
// Concurrency: a Server serves any number of connections at once; Serve owns one goroutine per
// connection plus a few per session, and returns only after all of them have ended.
package execserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"github.com/virtkit/virtkit/agent/proto"
	"github.com/virtkit/virtkit/agent/reaper"
)

// Config configures a Server. The zero value serves with defaults.
type Config struct {
	// Log receives failed requests and server errors; nil discards them. (The standard logger,
	// not slog or zerolog: the guest binary stays small.)
	Log *log.Logger
	// Debug also logs every session's start and end.
	Debug bool
	// Reaper starts and waits for session processes. Nil: a private one that reaps only the
	// server's own children. As PID 1, pass the init's orphan-reaping Reaper.
	Reaper *reaper.Reaper
	// Software names this agent in hellos and Info, e.g. "virtkit-agent v0.3.1".
	Software string
	// Version is the agent's software version reported by Info.
	Version string
	// Env is the base environment of every session (the image's env in entrypoint mode);
	// PATH defaults to a standard one when absent.
	Env []string
	// Allow, when non-empty, is the allow-list: a session's program, resolved through PATH, must
	// be one of these absolute paths (or bare names matching argv[0] exactly).
	Allow []string
	// Wrapper is prepended to every session's argv after the allow-list check (e.g. a sandbox or
	// a timeout program).
	Wrapper []string
	// Info fills in what the server does not know itself (mode, boot timings, entrypoint).
	Info func(*proto.Info)
	// Shutdown performs a guest shutdown after the reply has been sent. Nil: the server itself
	// stops serving (Serve returns nil).
	Shutdown func(poweroff bool)
	// WaitEntrypoint blocks until the entrypoint exits. Nil: Wait requests are refused.
	WaitEntrypoint func(ctx context.Context) (proto.Exit, error)
	// DrainIdle is how long a session keeps reading output after its process exited and the
	// output went quiet (orphans may hold the pipes open). Default 100ms.
	DrainIdle time.Duration
}

// Server is an exec server.
type Server struct {
	cfg    Config
	reaper *reaper.Reaper
	own    bool
	start  time.Time

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	stop   context.CancelFunc
	closed bool
}

// New returns a Server for cfg.
func New(cfg Config) *Server {
	s := &Server{cfg: cfg, reaper: cfg.Reaper, conns: map[net.Conn]struct{}{}, start: time.Now()}
	if s.cfg.Software == "" {
		s.cfg.Software = "virtkit-agent"
	}
	if s.cfg.DrainIdle == 0 {
		s.cfg.DrainIdle = 100 * time.Millisecond
	}
	s.cfg.Env = baseEnv(cfg.Env)
	return s
}

// Serve accepts connections on l until ctx is done, l fails, or a Shutdown request arrives with
// no Shutdown hook. It closes l and every connection, ends every session (killing its process
// group) and waits for all its goroutines before returning.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.mu.Lock()
	s.stop = cancel
	if s.reaper == nil {
		s.reaper = reaper.New(false)
		s.own = true
	}
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer func() {
		s.mu.Lock()
		s.closed = true
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		wg.Wait()
		if s.own {
			s.reaper.Close()
		}
	}()
	var tempDelay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			// Transient failures (EMFILE…) must not end the server of a running guest.
			if tempDelay == 0 {
				tempDelay = 5 * time.Millisecond
			} else if tempDelay *= 2; tempDelay > time.Second {
				tempDelay = time.Second
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("execserver: accept: %w", err)
			}
			s.logf("accept: %v", err)
			select {
			case <-time.After(tempDelay):
				continue
			case <-ctx.Done():
				return nil
			}
		}
		tempDelay = 0
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			continue
		}
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}()
			s.handle(ctx, c)
		}()
	}
}

// handle runs one connection. A bug in one request must not take the agent (maybe PID 1) down.
func (s *Server) handle(ctx context.Context, c net.Conn) {
	defer func() {
		if r := recover(); r != nil {
			s.logf("panic serving a connection: %v\n%s", r, debug.Stack())
		}
	}()
	r := proto.NewReader(c)
	w := proto.NewWriter(c)
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	f, err := r.Read()
	if err != nil {
		s.fail(w, proto.CodeProtocol, fmt.Errorf("read hello: %w", err))
		return
	}
	var h proto.Hello
	if f.Type != proto.THello {
		s.fail(w, proto.CodeProtocol, fmt.Errorf("%w: first frame is %s, want hello", proto.ErrFrame, f.Type))
		return
	}
	if err := proto.Decode(f, &h); err != nil {
		s.fail(w, proto.CodeProtocol, err)
		return
	}
	if err := w.WriteJSON(proto.THello, proto.Hello{Magic: proto.Magic, Version: proto.Version, Software: s.cfg.Software}); err != nil {
		return
	}
	if err := h.Check("client"); err != nil {
		code := proto.CodeProtocol
		var ve *proto.VersionError
		if errors.As(err, &ve) {
			code = proto.CodeVersion
		}
		s.fail(w, code, err)
		return
	}
	c.SetReadDeadline(time.Time{})
	for {
		f, err := r.Read()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.fail(w, proto.CodeProtocol, err)
			}
			return
		}
		switch f.Type {
		case proto.TPing:
			if w.Write(proto.TPong, nil) != nil {
				return
			}
		case proto.TInfo:
			if w.WriteJSON(proto.TInfo, s.info()) != nil {
				return
			}
		case proto.TWait:
			if !s.wait(ctx, w) {
				return
			}
		case proto.TShutdown:
			var req proto.Shutdown
			if err := proto.Decode(f, &req); err != nil {
				s.fail(w, proto.CodeProtocol, err)
				return
			}
			if w.Write(proto.TOK, nil) != nil {
				return
			}
			s.logf("shutdown requested (poweroff %v)", req.Poweroff)
			if s.cfg.Shutdown != nil {
				go s.cfg.Shutdown(req.Poweroff)
			} else {
				s.mu.Lock()
				s.stop()
				s.mu.Unlock()
			}
			return
		case proto.TExec:
			var req proto.Exec
			if err := proto.Decode(f, &req); err != nil {
				s.fail(w, proto.CodeProtocol, err)
				return
			}
			s.exec(c, r, w, req)
			return
		case proto.TCopyIn, proto.TCopyOut:
			var req proto.Path
			if err := proto.Decode(f, &req); err != nil {
				s.fail(w, proto.CodeProtocol, err)
				return
			}
			if f.Type == proto.TCopyIn {
				s.copyIn(r, w, req.Path)
			} else {
				s.copyOut(w, req.Path)
			}
			return
		case proto.TForward:
			var req proto.Forward
			if err := proto.Decode(f, &req); err != nil {
				s.fail(w, proto.CodeProtocol, err)
				return
			}
			s.forward(ctx, c, r, w, req)
			return
		default:
			s.fail(w, proto.CodeProtocol, fmt.Errorf("%w: unexpected %s frame on a fresh connection", proto.ErrFrame, f.Type))
			return
		}
	}
}

func (s *Server) logf(format string, args ...any) {
	if s.cfg.Log != nil {
		s.cfg.Log.Printf(format, args...)
	}
}

func (s *Server) debugf(format string, args ...any) {
	if s.cfg.Debug {
		s.logf(format, args...)
	}
}

// fail sends an error frame (best effort) and logs; the caller then closes the connection.
func (s *Server) fail(w *proto.Writer, code string, err error) {
	s.logf("request failed (%s): %v", code, err)
	_ = w.WriteJSON(proto.TError, proto.Error{Code: code, Message: err.Error()})
}

func (s *Server) info() proto.Info {
	in := proto.Info{Version: s.cfg.Version, Protocol: proto.Version, PID1: os.Getpid() == 1, Mode: "serve"}
	in.Hostname, _ = os.Hostname()
	in.Uptime = time.Since(s.start)
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		in.Kernel = string(trimNL(b))
	}
	if s.cfg.Info != nil {
		s.cfg.Info(&in)
	}
	return in
}

func (s *Server) wait(ctx context.Context, w *proto.Writer) bool {
	if s.cfg.WaitEntrypoint == nil {
		s.fail(w, proto.CodeUnsupport, errors.New("wait: no entrypoint runs in this mode"))
		return false
	}
	ex, err := s.cfg.WaitEntrypoint(ctx)
	if err != nil {
		s.fail(w, proto.CodeIO, fmt.Errorf("wait: %w", err))
		return false
	}
	return w.WriteJSON(proto.TExit, ex) == nil
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
