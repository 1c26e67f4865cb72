// Package addr turns virtkit's endpoint URLs into connections and listeners. Every agent listener
// and client takes one of:
//
//	vsock://CID:PORT     AF_VSOCK (mdlayher/vsock); listen with CID "any" or the local CID
//	hvsock://PATH:PORT   Cloud Hypervisor / Firecracker hybrid vsock: dial the unix socket PATH,
//	                     send "CONNECT PORT\n" and expect "OK <n>\n"; the stream is raw after that.
//	                     Listening on hvsock://PATH:PORT means listening on the unix socket PATH_PORT,
//	                     which is where the VMM sends guest→host connections to PORT.
//	unix://PATH          a unix stream socket
//	tcp://HOST:PORT      TCP
//
// It is used by the guest agent and by host code alike, so it stays dependency-light.
package addr

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/mdlayher/vsock"
)

// Well-known vsock ports (DESIGN.md).
const (
	PortExec    = 1024 // agent exec/control server
	PortNet     = 1025 // guest→host network relay
	PortControl = 1099 // guest→host fleet control (virtctl)
)

// Addr is a parsed endpoint URL.
type Addr struct {
	Scheme string // vsock, hvsock, unix, tcp
	Path   string // unix/hvsock socket path
	Host   string // tcp host:port
	CID    uint32 // vsock
	Port   uint32 // vsock/hvsock port
	Any    bool   // vsock listen on any CID
}

func (a Addr) String() string {
	switch a.Scheme {
	case "vsock":
		if a.Any {
			return fmt.Sprintf("vsock://any:%d", a.Port)
		}
		return fmt.Sprintf("vsock://%d:%d", a.CID, a.Port)
	case "hvsock":
		return fmt.Sprintf("hvsock://%s:%d", a.Path, a.Port)
	case "unix":
		return "unix://" + a.Path
	default:
		return "tcp://" + a.Host
	}
}

// Parse parses an endpoint URL. Errors say what shape was expected.
func Parse(s string) (Addr, error) {
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return Addr{}, fmt.Errorf("addr %q: want scheme://…, one of vsock, hvsock, unix, tcp", s)
	}
	switch scheme {
	case "vsock":
		c, p, ok := strings.Cut(rest, ":")
		if !ok {
			return Addr{}, fmt.Errorf("addr %q: want vsock://CID:PORT", s)
		}
		port, err := parsePort(p)
		if err != nil {
			return Addr{}, fmt.Errorf("addr %q: %w", s, err)
		}
		if c == "any" || c == "" {
			return Addr{Scheme: scheme, Port: port, Any: true}, nil
		}
		cid, err := strconv.ParseUint(c, 10, 32)
		if err != nil {
			return Addr{}, fmt.Errorf("addr %q: CID %q is not a number", s, c)
		}
		return Addr{Scheme: scheme, CID: uint32(cid), Port: port}, nil
	case "hvsock":
		i := strings.LastIndexByte(rest, ':')
		if i <= 0 {
			return Addr{}, fmt.Errorf("addr %q: want hvsock://PATH:PORT", s)
		}
		port, err := parsePort(rest[i+1:])
		if err != nil {
			return Addr{}, fmt.Errorf("addr %q: %w", s, err)
		}
		return Addr{Scheme: scheme, Path: rest[:i], Port: port}, nil
	case "unix":
		if rest == "" {
			return Addr{}, fmt.Errorf("addr %q: want unix://PATH", s)
		}
		return Addr{Scheme: scheme, Path: rest}, nil
	case "tcp":
		if _, _, err := net.SplitHostPort(rest); err != nil {
			return Addr{}, fmt.Errorf("addr %q: want tcp://HOST:PORT: %w", s, err)
		}
		return Addr{Scheme: scheme, Host: rest}, nil
	}
	return Addr{}, fmt.Errorf("addr %q: unknown scheme %q, want vsock, hvsock, unix or tcp", s, scheme)
}

func parsePort(p string) (uint32, error) {
	n, err := strconv.ParseUint(p, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("port %q is not a number", p)
	}
	return uint32(n), nil
}

// ErrRefused is returned by hybrid-vsock dials the VMM closed without "OK" (nobody listens).
var ErrRefused = errors.New("hybrid vsock: connection refused by the VMM (no guest listener?)")

// Dial connects to the URL s.
func Dial(ctx context.Context, s string) (net.Conn, error) {
	a, err := Parse(s)
	if err != nil {
		return nil, err
	}
	return a.Dial(ctx)
}

// Dial connects to a.
func (a Addr) Dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	switch a.Scheme {
	case "vsock":
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			c, err := vsock.Dial(a.CID, a.Port, nil)
			ch <- result{c, err}
		}()
		select {
		case r := <-ch:
			if r.err != nil {
				return nil, fmt.Errorf("dial %s: %w", a, r.err)
			}
			return r.c, nil
		case <-ctx.Done():
			go func() {
				if r := <-ch; r.c != nil {
					r.c.Close()
				}
			}()
			return nil, fmt.Errorf("dial %s: %w", a, ctx.Err())
		}
	case "hvsock":
		c, err := d.DialContext(ctx, "unix", a.Path)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", a, err)
		}
		if err := handshake(ctx, c, a.Port); err != nil {
			c.Close()
			return nil, fmt.Errorf("dial %s: %w", a, err)
		}
		return c, nil
	case "unix":
		c, err := d.DialContext(ctx, "unix", a.Path)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", a, err)
		}
		return c, nil
	default:
		c, err := d.DialContext(ctx, "tcp", a.Host)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", a, err)
		}
		return c, nil
	}
}

// handshake performs the hybrid-vsock CONNECT exchange, reading byte by byte so that no stream
// data after the OK line is consumed.
func handshake(ctx context.Context, c net.Conn, port uint32) error {
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(30 * time.Second))
	}
	defer c.SetDeadline(time.Time{})
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		return err
	}
	var line []byte
	b := make([]byte, 1)
	for len(line) < 64 {
		n, err := c.Read(b)
		if n == 1 {
			if b[0] == '\n' {
				break
			}
			line = append(line, b[0])
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if len(line) == 0 {
				return ErrRefused
			}
			return fmt.Errorf("hybrid vsock handshake: %w", err)
		}
	}
	if !strings.HasPrefix(string(line), "OK ") {
		return fmt.Errorf("hybrid vsock handshake: unexpected reply %q", line)
	}
	return nil
}

// Listen listens on the URL s. For hvsock://PATH:PORT it listens on the unix socket PATH_PORT.
// Stale unix socket files are removed first.
func Listen(s string) (net.Listener, error) {
	a, err := Parse(s)
	if err != nil {
		return nil, err
	}
	return a.Listen()
}

// Listen listens on a.
func (a Addr) Listen() (net.Listener, error) {
	switch a.Scheme {
	case "vsock":
		var l net.Listener
		var err error
		if a.Any {
			l, err = vsock.Listen(a.Port, nil)
		} else {
			l, err = vsock.ListenContextID(a.CID, a.Port, nil)
		}
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", a, err)
		}
		return l, nil
	case "hvsock":
		return listenUnix(fmt.Sprintf("%s_%d", a.Path, a.Port))
	case "unix":
		return listenUnix(a.Path)
	default:
		l, err := net.Listen("tcp", a.Host)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", a, err)
		}
		return l, nil
	}
}

func listenUnix(path string) (net.Listener, error) {
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen unix://%s: already in use by a live listener", path)
	}
	_ = removeSocket(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen unix://%s: %w", path, err)
	}
	return l, nil
}
