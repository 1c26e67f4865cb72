package execserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/virtkit/virtkit/agent/archive"
	"github.com/virtkit/virtkit/agent/proto"
)

// copyIn extracts the client's tar stream (TData frames up to TEOF) under dst.
func (s *Server) copyIn(r *proto.Reader, w *proto.Writer, dst string) {
	pr, pw := io.Pipe()
	go func() {
		for {
			f, err := r.Read()
			if err != nil {
				pw.CloseWithError(fmt.Errorf("copy in: read stream: %w", err))
				return
			}
			switch f.Type {
			case proto.TData:
				if _, err := pw.Write(f.Payload); err != nil {
					return
				}
			case proto.TEOF:
				pw.Close()
				return
			default:
				pw.CloseWithError(fmt.Errorf("%w: unexpected %s frame in a copy-in stream", proto.ErrFrame, f.Type))
				return
			}
		}
	}()
	err := archive.Unpack(pr, dst)
	if err == nil {
		// Read up to TEOF: tar's end blocks may be followed by padding.
		_, err = io.Copy(io.Discard, pr)
	}
	pr.CloseWithError(errors.New("copy in: done"))
	if err != nil {
		code := proto.CodeIO
		if errors.Is(err, fs.ErrNotExist) {
			code = proto.CodeNotFound
		}
		s.fail(w, code, err)
		return
	}
	_ = w.Write(proto.TOK, nil)
}

// frameWriter turns writes into TData frames.
type frameWriter struct{ w *proto.Writer }

func (fw frameWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		c := min(len(p), proto.DataChunk)
		if err := fw.w.Write(proto.TData, p[:c]); err != nil {
			return n, err
		}
		n += c
		p = p[c:]
	}
	return n, nil
}

// copyOut sends src as a tar stream of TData frames, then TOK (or TError).
func (s *Server) copyOut(w *proto.Writer, src string) {
	if err := archive.Pack(frameWriter{w}, src); err != nil {
		code := proto.CodeIO
		if errors.Is(err, fs.ErrNotExist) {
			code = proto.CodeNotFound
		}
		s.fail(w, code, err)
		return
	}
	_ = w.Write(proto.TOK, nil)
}

type closeWriter interface{ CloseWrite() error }

// forward connects to a TCP port in the guest and splices it with the client connection.
func (s *Server) forward(ctx context.Context, c net.Conn, r *proto.Reader, w *proto.Writer, req proto.Forward) {
	host := req.Host
	if host == "" {
		host = "127.0.0.1"
	}
	if req.Port <= 0 || req.Port > 65535 {
		s.fail(w, proto.CodeForward, fmt.Errorf("forward: bad port %d", req.Port))
		return
	}
	target := net.JoinHostPort(host, strconv.Itoa(req.Port))
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	var d net.Dialer
	t, err := d.DialContext(dctx, "tcp", target)
	cancel()
	if err != nil {
		s.fail(w, proto.CodeForward, fmt.Errorf("forward to %s: %w", target, err))
		return
	}
	defer t.Close()
	if err := w.Write(proto.TOK, nil); err != nil {
		return
	}
	splice(c, r.Buffered(), t)
}

// splice copies both ways, passing half-closes on, until both directions end.
func splice(c net.Conn, cr io.Reader, t net.Conn) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		_, err := io.Copy(t, cr)
		if cw, ok := t.(closeWriter); ok && err == nil {
			cw.CloseWrite()
		} else {
			t.Close()
		}
	}()
	go func() {
		defer wg.Done()
		_, err := io.Copy(c, t)
		if cw, ok := c.(closeWriter); ok && err == nil {
			cw.CloseWrite()
		} else {
			c.Close()
		}
	}()
	wg.Wait()
}
