package execserver

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/virtkit/virtkit/agent/proto"
)

// FuzzHandshake sends arbitrary bytes as the first thing on a connection: the agent must answer
// with well-formed frames ending in an error and close, never crash or hang, and keep serving.
// Inputs that form a valid hello are skipped: what follows a hello is a real request (it could
// run commands or write files), and the frame decoder itself is fuzzed in agent/proto.
func FuzzHandshake(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte("SSH-2.0-OpenSSH_9.2\r\n"))
	f.Add([]byte{0, 0, 0, 2, 1, '{', '}'})
	f.Add(append(proto.AppendHeader(nil, proto.THello, 33), `{"magic":"virtkit-agent","vers":1}`...))
	f.Add(append(proto.AppendHeader(nil, proto.THello, 37), `{"magic":"virtkit-agent","version":9}`...))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff})
	path := filepath.Join(f.TempDir(), "a.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		f.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	srv := New(Config{Allow: []string{"/nonexistent"}})
	go func() { srv.Serve(ctx, l); close(done) }()
	f.Cleanup(func() { cancel(); <-done })

	f.Fuzz(func(t *testing.T, data []byte) {
		if f, err := proto.NewReader(bytes.NewReader(data)).Read(); err == nil && f.Type == proto.THello {
			var h proto.Hello
			if proto.Decode(f, &h) == nil && h.Check("client") == nil {
				return
			}
		}
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(data)
		c.(*net.UnixConn).CloseWrite()
		r := proto.NewReader(c)
		var last proto.Type
		for {
			fr, err := r.Read()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("agent reply not well-formed or not closed: %v", err)
				}
				break
			}
			last = fr.Type
		}
		if last != proto.TError {
			t.Fatalf("last frame %v, want an error frame", last)
		}
	})
}
