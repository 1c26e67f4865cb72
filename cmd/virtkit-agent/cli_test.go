package main_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// serve runs `virtkit-agent serve` on a unix socket until the test ends and returns its URL.
func serve(t *testing.T, extra ...string) (bin, url string) {
	t.Helper()
	bin = cmdtest.Binary(t, "virtkit-agent")
	url = "unix://" + filepath.Join(t.TempDir(), "agent.sock")
	cmd := exec.Command(bin, append([]string{"serve", "--listen", url}, extra...)...)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("agent log:\n%s", logs.String())
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.WaitReady(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	return bin, url
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

func TestExecCommand(t *testing.T) {
	bin, url := serve(t)
	for _, tc := range []struct {
		args  []string
		stdin string
		out   string
		code  int
	}{
		{args: []string{"--", "sh", "-c", "cat; exit 4"}, stdin: "piped\n", out: "piped\n", code: 4},
		{args: []string{"-e", "A=1", "-e", "HOME", "-w", "/", "--", "sh", "-c", `echo "$A $HOME $(pwd)"`}, out: "1 " + os.Getenv("HOME") + " /\n"},
		{args: []string{"--", "sh", "-c", "kill -USR1 $$"}, code: 128 + 10},
		{args: []string{"--", "no-such-program"}, code: 127},
	} {
		cmd := exec.Command(bin, append([]string{"exec", "--connect", url}, tc.args...)...)
		cmd.Stdin = strings.NewReader(tc.stdin)
		out, err := cmd.Output()
		if string(out) != tc.out || exitCode(err) != tc.code {
			t.Errorf("exec %q: %q exit %d (%v); want %q exit %d", tc.args, out, exitCode(err), err, tc.out, tc.code)
		}
	}
}

func TestExecForwardsSignals(t *testing.T) {
	bin, url := serve(t)
	cmd := exec.Command(bin, "exec", "--connect", url, "--", "sh", "-c", `trap 'echo interrupted; exit 9' INT; echo ready; while :; do sleep 0.05; done`)
	out, _ := cmd.StdoutPipe()
	cmd.Stdin = nil
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(out)
	if line, err := r.ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("first line %q %v", line, err)
	}
	cmd.Process.Signal(syscall.SIGINT) // Ctrl-C on the host reaches the guest process
	rest, _ := io.ReadAll(r)
	err := cmd.Wait()
	if string(rest) != "interrupted\n" || exitCode(err) != 9 {
		t.Fatalf("after SIGINT: %q exit %d", rest, exitCode(err))
	}
}

func TestCp(t *testing.T) {
	bin, url := serve(t)
	src := filepath.Join(t.TempDir(), "site")
	os.MkdirAll(filepath.Join(src, "css"), 0o755)
	os.WriteFile(filepath.Join(src, "index.html"), []byte("<h1>hi</h1>"), 0o644)
	os.WriteFile(filepath.Join(src, "css/a.css"), []byte("body{}"), 0o600)
	guest := filepath.Join(t.TempDir(), "srv")
	if out, err := exec.Command(bin, "cp", "--connect", url, src, ":"+guest).CombinedOutput(); err != nil {
		t.Fatalf("cp in: %v %s", err, out)
	}
	if b, err := os.ReadFile(filepath.Join(guest, "site/css/a.css")); err != nil || string(b) != "body{}" {
		t.Fatalf("copied in: %q %v", b, err)
	}
	back := t.TempDir()
	if out, err := exec.Command(bin, "cp", "--connect", url, ":"+filepath.Join(guest, "site/index.html"), back).CombinedOutput(); err != nil {
		t.Fatalf("cp out: %v %s", err, out)
	}
	if b, err := os.ReadFile(filepath.Join(back, "index.html")); err != nil || string(b) != "<h1>hi</h1>" {
		t.Fatalf("copied out: %q %v", b, err)
	}
	out, err := exec.Command(bin, "cp", "--connect", url, ":/no/such/file", back).CombinedOutput()
	if exitCode(err) != 1 || !strings.Contains(string(out), "no such file") {
		t.Fatalf("cp of a missing file: %v %s", err, out)
	}
	if out, err := exec.Command(bin, "cp", "--connect", url, "a", "b").CombinedOutput(); exitCode(err) != 2 {
		t.Fatalf("cp without a guest path: %v %s", err, out)
	}
}

func upperEcho(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
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
				b, _ := io.ReadAll(c)
				c.Write(bytes.ToUpper(b))
			}()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestForwardAndConnect(t *testing.T) {
	bin, url := serve(t)
	guestPort := upperEcho(t)
	hostPort := freePort(t)
	fwd := exec.Command(bin, "forward", "--listen", fmt.Sprintf("tcp://127.0.0.1:%d", hostPort), "--connect", url, "--to", fmt.Sprint(guestPort))
	var ferr bytes.Buffer
	fwd.Stderr = &ferr
	if err := fwd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fwd.Process.Signal(syscall.SIGTERM); fwd.Wait() })
	var conn net.Conn
	var err error
	for range 100 {
		if conn, err = net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort)); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("forward never listened: %v %s", err, ferr.String())
	}
	io.WriteString(conn, "via forward")
	conn.(*net.TCPConn).CloseWrite()
	b, _ := io.ReadAll(conn)
	conn.Close()
	if string(b) != "VIA FORWARD" {
		t.Fatalf("forwarded: %q; %s", b, ferr.String())
	}

	// connect: an SSH ProxyCommand is stdin/stdout to the guest port.
	cmd := exec.Command(bin, "connect", "--port", fmt.Sprint(guestPort), url)
	cmd.Stdin = strings.NewReader("via connect")
	out, err := cmd.Output()
	if err != nil || string(out) != "VIA CONNECT" {
		t.Fatalf("connect: %q %v", out, err)
	}
	cmd = exec.Command(bin, "connect", "--direct", fmt.Sprintf("tcp://127.0.0.1:%d", guestPort))
	cmd.Stdin = strings.NewReader("direct")
	if out, err = cmd.Output(); err != nil || string(out) != "DIRECT" {
		t.Fatalf("connect --direct: %q %v", out, err)
	}
}

func TestInfoShutdownWait(t *testing.T) {
	bin, url := serve(t)
	out, err := exec.Command(bin, "info", "--connect", url).Output()
	if err != nil || !strings.Contains(string(out), `"protocol": 1`) || !strings.Contains(string(out), `"mode": "serve"`) {
		t.Fatalf("info: %s %v", out, err)
	}
	// Plain `serve` has no entrypoint: wait says so.
	out, err = exec.Command(bin, "wait", "--connect", url, "--timeout", "5s").CombinedOutput()
	if exitCode(err) != 255 || !strings.Contains(string(out), "no entrypoint") {
		t.Fatalf("wait without an entrypoint: %s %v", out, err)
	}
	// Shutdown of a plain `serve` stops the server.
	if out, err := exec.Command(bin, "shutdown", "--connect", url).CombinedOutput(); err != nil {
		t.Fatalf("shutdown: %s %v", out, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	time.Sleep(100 * time.Millisecond)
	if c, err := client.Dial(ctx, url); err == nil {
		c.Close()
		t.Fatal("agent still serving after shutdown")
	}
}

// openPTY gives the test a terminal to run the client in, as a user's shell would.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(); s.Close() })
	return m, s
}

// TestExecTTY runs `exec -t` on a host terminal: the guest sees the host's size, follows a
// resize, and Ctrl-C typed on the host interrupts the guest's foreground process.
func TestExecTTY(t *testing.T) {
	bin, url := serve(t)
	m, s := openPTY(t)
	unix.IoctlSetWinsize(int(s.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 31, Col: 91})
	cmd := exec.Command(bin, "exec", "-t", "--connect", url, "--", "sh", "-c", `stty size; trap 'echo got-int' INT; sleep 100; stty size; read x; exit 6`)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = s, s, s
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	var seen bytes.Buffer
	buf := make([]byte, 4096)
	expect := func(want string) {
		t.Helper()
		m.SetReadDeadline(time.Now().Add(15 * time.Second))
		for !strings.Contains(seen.String(), want) {
			n, err := m.Read(buf)
			seen.Write(buf[:n])
			if err != nil {
				t.Fatalf("waiting for %q: %v; got %q", want, err, seen.String())
			}
		}
	}
	expect("31 91")
	time.Sleep(200 * time.Millisecond) // sleep is running in the foreground
	unix.IoctlSetWinsize(int(s.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 40, Col: 100})
	time.Sleep(200 * time.Millisecond)
	m.Write([]byte{3}) // Ctrl-C
	expect("got-int")
	expect("40 100")
	m.Write([]byte("\r"))
	select {
	case err := <-done:
		if exitCode(err) != 6 {
			t.Fatalf("exit %v; terminal:\n%s", err, seen.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("client did not exit; terminal:\n%s", seen.String())
	}
}
