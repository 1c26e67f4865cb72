package lan

import (
	"bytes"
	"io"
	"net"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
)

// TestHostReader: readable reports what a host socket holds and the end of its stream, and a
// hostReader hands exactly the announced bytes to a gVisor buffer, which reads it until EOF.
func TestHostReader(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	peer, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("0123456789abcdef"), 10000) // more than one 64 KiB chunk
	if _, err := peer.Write(want); err != nil {
		t.Fatal(err)
	}
	peer.(*net.TCPConn).CloseWrite()
	var got []byte
	for {
		n, err := readable(rc)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break // the peer's FIN
		}
		r := &hostReader{rc: rc, n: n}
		var b buffer.Buffer
		if _, err := b.WriteFromReader(r, int64(r.Len())); err != nil {
			t.Fatal(err)
		}
		if r.n != 0 || r.err != nil {
			t.Fatalf("after the buffer read: %d bytes announced left, err %v", r.n, r.err)
		}
		if k, err := r.Read(make([]byte, 10)); k != 0 || err != io.EOF {
			t.Fatalf("Read past what was announced = %d, %v; want 0, EOF", k, err)
		}
		got = append(got, b.Flatten()...)
		b.Release()
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, want the %d sent", len(got), len(want))
	}
}
