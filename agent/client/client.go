// Package client is the host side of the agent protocol (agent/proto): it dials an agent by
// endpoint URL (agent/addr: vsock, hvsock, unix, tcp) and runs commands, copies files, forwards
// ports and shuts the guest down.
//
// A Client keeps one control connection for Ping, Info and Shutdown and opens a fresh connection
// for every session, copy and forward, so sessions never contend with one another and each has
// its own flow control. Requests are pipelined behind the hello, so a session costs one round
// trip plus the transport's connect.
//
// Concurrency: a Client and a Session are safe for concurrent use. Session output is written
// from one goroutine per session; a slow stdout writer slows (never grows) that session only.
package client

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/agent/proto"
)

// Software names this client in hellos.
var Software = "virtkit-agent-client"

// Client talks to one agent.
type Client struct {
	addr addr.Addr

	mu    sync.Mutex // guards the control connection
	ctl   *conn
	agent proto.Hello
}

// conn is one protocol connection.
type conn struct {
	c net.Conn
	r *proto.Reader
	w *proto.Writer
}

func (c *conn) Close() error { return c.c.Close() }

// Dial connects to the agent at url and checks that it speaks this protocol version.
func Dial(ctx context.Context, url string) (*Client, error) {
	a, err := addr.Parse(url)
	if err != nil {
		return nil, err
	}
	cl := &Client{addr: a}
	ctl, h, err := cl.open(ctx, 0, nil)
	if err != nil {
		return nil, err
	}
	cl.ctl, cl.agent = ctl, h
	return cl, nil
}

// WaitReady dials url and pings until the agent answers or ctx ends (a booting VM's agent is not
// listening yet). A protocol version mismatch ends the wait at once: retrying cannot fix it.
func WaitReady(ctx context.Context, url string) (*Client, error) {
	if _, err := addr.Parse(url); err != nil {
		return nil, err
	}
	delay := 10 * time.Millisecond
	var last error
	for {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := Dial(actx, url)
		if err == nil {
			err = c.Ping(actx)
			if err == nil {
				cancel()
				return c, nil
			}
			c.Close()
		}
		cancel()
		var ve *proto.VersionError
		var re *proto.RemoteError
		if errors.As(err, &ve) || errors.As(err, &re) && re.Code == proto.CodeVersion {
			return nil, err
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for agent at %s: %w (last error: %v)", url, ctx.Err(), last)
		case <-time.After(delay):
		}
		delay = min(delay*2, 250*time.Millisecond)
	}
}

// Agent is the agent's hello: its protocol version and software.
func (c *Client) Agent() proto.Hello { return c.agent }

// Close closes the control connection. Sessions opened before keep running until they end.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctl == nil {
		return nil
	}
	err := c.ctl.Close()
	c.ctl = nil
	return err
}

// open dials a new connection, sends hello and (if t != 0) the first request in the same write
// burst, and checks the agent's hello.
func (c *Client) open(ctx context.Context, t proto.Type, req any) (*conn, proto.Hello, error) {
	nc, err := c.addr.Dial(ctx)
	if err != nil {
		return nil, proto.Hello{}, fmt.Errorf("agent: %w", err)
	}
	cn := &conn{c: nc, r: proto.NewReader(nc), w: proto.NewWriter(nc)}
	stop := deadline(ctx, nc)
	defer stop()
	h, err := cn.handshake(t, req)
	if err != nil {
		nc.Close()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return nil, proto.Hello{}, fmt.Errorf("agent %s: %w", c.addr, err)
	}
	return cn, h, nil
}

func (cn *conn) handshake(t proto.Type, req any) (proto.Hello, error) {
	if err := cn.w.WriteJSON(proto.THello, proto.Hello{Magic: proto.Magic, Version: proto.Version, Software: Software}); err != nil {
		return proto.Hello{}, err
	}
	if t != 0 {
		if err := cn.w.WriteJSON(t, req); err != nil {
			return proto.Hello{}, err
		}
	}
	f, err := cn.r.Read()
	if err != nil {
		return proto.Hello{}, fmt.Errorf("read hello: %w", err)
	}
	if f.Type == proto.TError {
		return proto.Hello{}, remoteErr(f)
	}
	if f.Type != proto.THello {
		return proto.Hello{}, fmt.Errorf("%w: got %s before hello", proto.ErrFrame, f.Type)
	}
	var h proto.Hello
	if err := proto.Decode(f, &h); err != nil {
		return proto.Hello{}, err
	}
	if err := h.Check("agent"); err != nil {
		return h, err
	}
	return h, nil
}

// deadline applies ctx's deadline and cancellation to nc until the returned stop is called.
func deadline(ctx context.Context, nc net.Conn) (stop func()) {
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	s := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	return func() {
		s()
		nc.SetDeadline(time.Time{})
	}
}

func remoteErr(f proto.Frame) error {
	var e proto.Error
	if err := proto.Decode(f, &e); err != nil {
		return err
	}
	re := proto.RemoteError(e)
	return &re
}

// expect reads one frame and fails on an agent error or a frame of another type.
func (cn *conn) expect(t proto.Type) (proto.Frame, error) {
	f, err := cn.r.Read()
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("agent closed the connection: %w", io.ErrUnexpectedEOF)
		}
		return proto.Frame{}, err
	}
	if f.Type == proto.TError {
		return proto.Frame{}, remoteErr(f)
	}
	if f.Type != t {
		return proto.Frame{}, fmt.Errorf("%w: got %s, want %s", proto.ErrFrame, f.Type, t)
	}
	return f, nil
}

// control runs one request/reply on the control connection, reconnecting once if it broke (the
// agent may have restarted, or an idle vsock connection may have been reset).
func (c *Client) control(ctx context.Context, t proto.Type, req any, want proto.Type, reply any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for attempt := 0; ; attempt++ {
		if c.ctl == nil {
			ctl, h, err := c.open(ctx, 0, nil)
			if err != nil {
				return err
			}
			c.ctl, c.agent = ctl, h
		}
		err := c.roundTrip(ctx, t, req, want, reply)
		if err == nil {
			return nil
		}
		var re *proto.RemoteError
		if errors.As(err, &re) || ctx.Err() != nil || attempt > 0 {
			if !errors.As(err, &re) {
				c.ctl.Close()
				c.ctl = nil
			}
			return fmt.Errorf("agent %s: %s: %w", c.addr, t, err)
		}
		c.ctl.Close()
		c.ctl = nil
	}
}

func (c *Client) roundTrip(ctx context.Context, t proto.Type, req any, want proto.Type, reply any) error {
	stop := deadline(ctx, c.ctl.c)
	defer stop()
	var err error
	if req == nil {
		err = c.ctl.w.Write(t, nil)
	} else {
		err = c.ctl.w.WriteJSON(t, req)
	}
	if err != nil {
		return err
	}
	f, err := c.ctl.expect(want)
	if err != nil {
		return err
	}
	if reply != nil {
		return proto.Decode(f, reply)
	}
	return nil
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	return c.control(ctx, proto.TPing, nil, proto.TPong, nil)
}

// Info returns the agent's version, boot timings, hostname and entrypoint state.
func (c *Client) Info(ctx context.Context) (proto.Info, error) {
	var in proto.Info
	err := c.control(ctx, proto.TInfo, nil, proto.TInfo, &in)
	return in, err
}

// Shutdown asks the guest to power off (or reboot when poweroff is false). It returns once the
// agent has accepted; the VM then goes down.
func (c *Client) Shutdown(ctx context.Context, poweroff bool) error {
	err := c.control(ctx, proto.TShutdown, proto.Shutdown{Poweroff: poweroff}, proto.TOK, nil)
	c.Close()
	return err
}

// WaitEntrypoint blocks until the image entrypoint (entrypoint mode) has exited and returns how.
func (c *Client) WaitEntrypoint(ctx context.Context) (ExitStatus, error) {
	cn, _, err := c.open(ctx, proto.TWait, struct{}{})
	if err != nil {
		return ExitStatus{}, err
	}
	defer cn.Close()
	stop := deadline(ctx, cn.c)
	defer stop()
	f, err := cn.expect(proto.TExit)
	if err != nil {
		return ExitStatus{}, fmt.Errorf("agent %s: wait: %w", c.addr, err)
	}
	var ex proto.Exit
	if err := proto.Decode(f, &ex); err != nil {
		return ExitStatus{}, err
	}
	return ExitStatus(ex), nil
}

// CopyIn extracts the tar stream under the guest folder dst (created if missing).
func (c *Client) CopyIn(ctx context.Context, dst string, tarStream io.Reader) error {
	cn, _, err := c.open(ctx, proto.TCopyIn, proto.Path{Path: dst})
	if err != nil {
		return err
	}
	defer cn.Close()
	stop := context.AfterFunc(ctx, func() { cn.Close() })
	defer stop()
	reply := make(chan error, 1)
	go func() {
		_, err := cn.expect(proto.TOK)
		reply <- err
	}()
	buf := make([]byte, proto.HeaderLen+proto.DataChunk)
	var sendErr error
	for sendErr == nil {
		n, rerr := tarStream.Read(buf[proto.HeaderLen:])
		if n > 0 {
			if err := cn.w.WriteRaw(proto.TData, buf[:proto.HeaderLen+n]); err != nil {
				sendErr = err
				break
			}
		}
		if rerr == io.EOF {
			sendErr = cn.w.Write(proto.TEOF, nil)
			break
		}
		if rerr != nil {
			return fmt.Errorf("agent %s: copy in %s: read local tar: %w", c.addr, dst, rerr)
		}
		select {
		case err := <-reply:
			// The agent answered early: only an error can come before TEOF.
			if err == nil {
				err = fmt.Errorf("%w: agent acknowledged before end of stream", proto.ErrFrame)
			}
			return fmt.Errorf("agent %s: copy in %s: %w", c.addr, dst, err)
		default:
		}
	}
	err = <-reply
	if err == nil && sendErr != nil {
		err = sendErr
	}
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return fmt.Errorf("agent %s: copy in %s: %w", c.addr, dst, err)
	}
	return nil
}

// CopyOut writes the guest file or folder src to w as a tar stream (entries named base(src)/…).
func (c *Client) CopyOut(ctx context.Context, src string, w io.Writer) error {
	cn, _, err := c.open(ctx, proto.TCopyOut, proto.Path{Path: src})
	if err != nil {
		return err
	}
	defer cn.Close()
	stop := context.AfterFunc(ctx, func() { cn.Close() })
	defer stop()
	for {
		f, err := cn.r.Read()
		if err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			return fmt.Errorf("agent %s: copy out %s: %w", c.addr, src, err)
		}
		switch f.Type {
		case proto.TData:
			if _, err := w.Write(f.Payload); err != nil {
				return fmt.Errorf("agent %s: copy out %s: write: %w", c.addr, src, err)
			}
		case proto.TOK:
			return nil
		case proto.TError:
			return fmt.Errorf("agent %s: copy out %s: %w", c.addr, src, remoteErr(f))
		default:
			return fmt.Errorf("agent %s: copy out %s: %w: unexpected %s", c.addr, src, proto.ErrFrame, f.Type)
		}
	}
}

// Forward connects to TCP guestPort on the guest's loopback through the agent and returns the
// stream. CloseWrite half-closes when the transport supports it.
func (c *Client) Forward(ctx context.Context, guestPort int) (net.Conn, error) {
	cn, _, err := c.open(ctx, proto.TForward, proto.Forward{Port: guestPort})
	if err != nil {
		return nil, err
	}
	stop := deadline(ctx, cn.c)
	_, err = cn.expect(proto.TOK)
	stop()
	if err != nil {
		cn.Close()
		return nil, fmt.Errorf("agent %s: forward to guest port %d: %w", c.addr, guestPort, err)
	}
	return &streamConn{Conn: cn.c, r: cn.r.Buffered()}, nil
}

// streamConn is a forwarded stream: reads drain what the frame reader buffered first.
type streamConn struct {
	net.Conn
	r *bufio.Reader
}

func (s *streamConn) Read(p []byte) (int, error) { return s.r.Read(p) }

// CloseWrite half-closes the stream if the transport can.
func (s *streamConn) CloseWrite() error {
	if cw, ok := s.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("forward: transport cannot half-close")
}
