package cli

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/virtkit/virtkit/agent/execserver"
)

// TestForward runs `virtkit forward` against an in-process agent and a guest-side echo server.
func TestForward(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	al, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go execserver.New(execserver.Config{}).Serve(ctx, al)

	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	pl, _ := net.Listen("tcp", "127.0.0.1:0")
	hostPort := pl.Addr().(*net.TCPAddr).Port
	pl.Close()

	done := make(chan int, 1)
	go func() {
		done <- Execute(ctx, []string{"--state-dir", t.TempDir(), "forward", "--connect", "unix://" + sock,
			"--listen", fmt.Sprintf("tcp://127.0.0.1:%d", hostPort), "--to", fmt.Sprint(echo.Addr().(*net.TCPAddr).Port)})
	}()
	var c net.Conn
	for range 200 {
		if c, err = net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort)); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("virtkit forward never listened: %v", err)
	}
	io.WriteString(c, "ping through virtkit forward")
	c.(*net.TCPConn).CloseWrite()
	b, _ := io.ReadAll(c)
	c.Close()
	if string(b) != "ping through virtkit forward" {
		t.Fatalf("echo: %q", b)
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("virtkit forward exited %d", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("virtkit forward did not stop with its context")
	}
	if code := Execute(context.Background(), []string{"forward", "--connect", "unix://" + sock}); code == 0 {
		t.Fatal("forward without --to succeeded")
	}
}
