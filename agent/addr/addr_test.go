package addr

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string
		bad  bool
	}{
		{in: "vsock://3:1024", want: "vsock://3:1024"},
		{in: "vsock://any:1024", want: "vsock://any:1024"},
		{in: "hvsock:///run/vm/v.sock:1024", want: "hvsock:///run/vm/v.sock:1024"},
		{in: "unix:///tmp/x.sock", want: "unix:///tmp/x.sock"},
		{in: "tcp://127.0.0.1:80", want: "tcp://127.0.0.1:80"},
		{in: "vsock://x:1", bad: true},
		{in: "vsock://3", bad: true},
		{in: "hvsock:///p", bad: true},
		{in: "ftp://x", bad: true},
		{in: "nourl", bad: true},
		{in: "tcp://nohostport", bad: true},
	} {
		a, err := Parse(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("Parse(%q) = %v, want error", tc.in, a)
			}
			continue
		}
		if err != nil || a.String() != tc.want {
			t.Errorf("Parse(%q) = %v, %v; want %s", tc.in, a, err, tc.want)
		}
	}
}

// fakeVMM plays the VMM side of hybrid vsock on a unix socket.
func fakeVMM(t *testing.T, path string, accept bool) {
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil || !strings.HasPrefix(line, "CONNECT ") {
					return
				}
				if !accept {
					return
				}
				io.WriteString(c, "OK 1073741824\nhello")
				io.Copy(io.Discard, c)
			}()
		}
	}()
}

func TestHybridDial(t *testing.T) {
	dir := t.TempDir()
	ok := filepath.Join(dir, "ok.sock")
	no := filepath.Join(dir, "no.sock")
	fakeVMM(t, ok, true)
	fakeVMM(t, no, false)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, "hvsock://"+ok+":1024")
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 5)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "hello" {
		t.Fatalf("after handshake read %q, %v", b, err)
	}
	c.Close()
	if _, err := Dial(ctx, "hvsock://"+no+":1024"); !errors.Is(err, ErrRefused) {
		t.Fatalf("refused dial: %v, want ErrRefused", err)
	}
}

func TestHybridListenPath(t *testing.T) {
	dir := t.TempDir()
	l, err := Listen("hvsock://" + filepath.Join(dir, "v.sock") + ":1025")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if got := l.Addr().String(); got != filepath.Join(dir, "v.sock_1025") {
		t.Fatalf("listening on %s", got)
	}
	if _, err := Listen("hvsock://" + filepath.Join(dir, "v.sock") + ":1025"); err == nil {
		t.Fatal("second listen on a live socket succeeded")
	}
}
