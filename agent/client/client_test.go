package client_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/agent/archive"
	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/agent/execserver"
	"github.com/virtkit/virtkit/agent/proto"
)

// countingListener counts the bytes the server writes, to check its buffering stays bounded.
type countingListener struct {
	net.Listener
	written atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, n: &l.written}, nil
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func (c *countingConn) CloseWrite() error { return c.Conn.(*net.UnixConn).CloseWrite() }

type agent struct {
	url string
	l   *countingListener
	srv *execserver.Server
}

// startAgent runs an exec server on a unix socket in this process until the test ends.
func startAgent(t *testing.T, cfg execserver.Config) *agent {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	ul, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l := &countingListener{Listener: ul}
	cfg.Version = "test"
	srv := execserver.New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return &agent{url: "unix://" + path, l: l, srv: srv}
}

func dial(t *testing.T, a *agent) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, a.url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func run(t *testing.T, c *client.Client, stdin string, argv ...string) (string, string, client.ExitStatus) {
	t.Helper()
	var out, errb bytes.Buffer
	var in io.Reader
	if stdin != "" {
		in = strings.NewReader(stdin)
	}
	st, err := c.Exec(testCtx(t), client.ExecRequest{Argv: argv}, in, &out, &errb)
	if err != nil {
		t.Fatalf("exec %q: %v", argv, err)
	}
	return out.String(), errb.String(), st
}

func TestPingInfo(t *testing.T) {
	a := startAgent(t, execserver.Config{Info: func(in *proto.Info) { in.Mode = "agent" }})
	c := dial(t, a)
	if err := c.Ping(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	in, err := c.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if in.Version != "test" || in.Protocol != proto.Version || in.Hostname != host || in.Mode != "agent" {
		t.Fatalf("info = %+v", in)
	}
}

func TestExitCodesAndStreams(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	for _, tc := range []struct {
		argv         []string
		out, errs    string
		code, signal int
	}{
		{argv: []string{"true"}},
		{argv: []string{"sh", "-c", "echo out; echo err >&2; exit 3"}, out: "out\n", errs: "err\n", code: 3},
		{argv: []string{"sh", "-c", "exit 255"}, code: 255},
		{argv: []string{"sh", "-c", "kill -TERM $$"}, code: 128 + 15, signal: 15},
		{argv: []string{"sh", "-c", "kill -KILL $$"}, code: 128 + 9, signal: 9},
	} {
		out, errs, st := run(t, c, "", tc.argv...)
		if out != tc.out || errs != tc.errs || st.Code != tc.code || st.Signal != tc.signal {
			t.Errorf("%q: out %q err %q status %+v; want %q %q code %d signal %d", tc.argv, out, errs, st, tc.out, tc.errs, tc.code, tc.signal)
		}
	}
}

func TestEnvDirUser(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{Env: []string{"BASE=1", "FOO=base"}}))
	dir := t.TempDir()
	var out bytes.Buffer
	st, err := c.Exec(testCtx(t), client.ExecRequest{Argv: []string{"sh", "-c", `echo "$BASE $FOO $(pwd)"`}, Env: []string{"FOO=over"}, Dir: dir}, nil, &out, nil)
	if err != nil || st.Code != 0 || out.String() != "1 over "+dir+"\n" {
		t.Fatalf("env/dir: %q %+v %v", out.String(), st, err)
	}
	if os.Geteuid() != 0 {
		return
	}
	for user, want := range map[string]string{"nobody": "65534:65534", "1234:4321": "1234:4321", "0": "0:0"} {
		out.Reset()
		st, err := c.Exec(testCtx(t), client.ExecRequest{Argv: []string{"sh", "-c", `echo "$(id -u):$(id -g)"`}, User: user, Dir: "/"}, nil, &out, nil)
		if err != nil || st.Code != 0 || strings.TrimSpace(out.String()) != want {
			t.Errorf("user %s: %q %+v %v, want %s", user, out.String(), st, err, want)
		}
	}
	_, err = c.Exec(testCtx(t), client.ExecRequest{Argv: []string{"true"}, User: "no-such-user-xyz"}, nil, nil, nil)
	var re *proto.RemoteError
	if !errors.As(err, &re) || re.Code != proto.CodeNotFound {
		t.Errorf("unknown user: %v, want a not-found agent error", err)
	}
}

func TestStdin(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	out, _, st := run(t, c, "hello\nworld\n", "cat")
	if out != "hello\nworld\n" || st.Code != 0 {
		t.Fatalf("cat: %q %+v", out, st)
	}
	// More stdin than the window, through a process that reads it all.
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB
	var o bytes.Buffer
	st, err := c.Exec(testCtx(t), client.ExecRequest{Argv: []string{"wc", "-c"}}, bytes.NewReader(big), &o, nil)
	if err != nil || strings.TrimSpace(o.String()) != fmt.Sprint(len(big)) {
		t.Fatalf("wc -c of 4 MiB: %q %+v %v", o.String(), st, err)
	}
	// A command that never reads stdin still exits, and a blocked stdin does not hang the session.
	st, err = c.Exec(testCtx(t), client.ExecRequest{Argv: []string{"true"}}, bytes.NewReader(big), nil, nil)
	if err != nil || st.Code != 0 {
		t.Fatalf("true with unread stdin: %+v %v", st, err)
	}
	// EOF reaches the process: read returns and the shell sees it.
	out, _, _ = run(t, c, "x", "sh", "-c", "read a; echo rc=$? a=$a")
	if out != "rc=1 a=x\n" {
		t.Fatalf("read to EOF: %q", out)
	}
}

type countWriter struct{ n int64 }

func (w *countWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	return len(p), nil
}

func TestGiBStdout(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	var w countWriter
	st, err := c.Exec(testCtx(t), client.ExecRequest{Argv: []string{"head", "-c", "1073741824", "/dev/zero"}}, nil, &w, nil)
	if err != nil || st.Code != 0 || w.n != 1<<30 {
		t.Fatalf("1 GiB: got %d bytes, %+v, %v", w.n, st, err)
	}
}

func TestConcurrentSessions(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out bytes.Buffer
			st, err := c.Exec(testCtx(t), client.ExecRequest{Argv: []string{"sh", "-c", "sleep 0.2; echo $0; exit $(($0 % 7))", fmt.Sprint(i)}}, nil, &out, nil)
			if err != nil || out.String() != fmt.Sprintf("%d\n", i) || st.Code != i%7 {
				errs <- fmt.Errorf("session %d: %q %+v %v", i, out.String(), st, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func readUntil(t *testing.T, r *bufio.Reader, want string) string {
	t.Helper()
	var got strings.Builder
	for !strings.Contains(got.String(), want) {
		b, err := r.ReadByte()
		if err != nil {
			t.Fatalf("waiting for %q, got %q: %v", want, got.String(), err)
		}
		got.WriteByte(b)
	}
	return got.String()
}

func TestSignals(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	s, err := c.Start(testCtx(t), client.ExecRequest{Argv: []string{"sh", "-c", `trap 'echo got INT; exit 42' INT; echo ready; while :; do sleep 0.05; done`}})
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, s.Stderr())
	r := bufio.NewReader(s.Stdout())
	readUntil(t, r, "ready\n")
	if err := s.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	readUntil(t, r, "got INT\n")
	go io.Copy(io.Discard, r)
	st, err := s.Wait()
	if err != nil || st.Code != 42 {
		t.Fatalf("after SIGINT: %+v %v, want code 42", st, err)
	}
}

func TestTTYResize(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	s, err := c.Start(testCtx(t), client.ExecRequest{Argv: []string{"sh", "-c", `stty size; [ -t 0 ] && echo tty-yes; read x; stty size`}, TTY: true, Rows: 24, Cols: 80})
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(s.Stdout())
	readUntil(t, r, "24 80")
	readUntil(t, r, "tty-yes")
	if err := s.Resize(40, 132); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(s.Stdin(), "go\n"); err != nil {
		t.Fatal(err)
	}
	readUntil(t, r, "40 132")
	go io.Copy(io.Discard, r)
	if st, err := s.Wait(); err != nil || st.Code != 0 {
		t.Fatalf("tty session: %+v %v", st, err)
	}
}

func processGone(pid int) bool {
	err := syscall.Kill(pid, 0)
	return errors.Is(err, syscall.ESRCH)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestVanishingClientAndBackPressure(t *testing.T) {
	a := startAgent(t, execserver.Config{})
	base := runtime.NumGoroutine()
	c := dial(t, a)
	before := a.l.written.Load()
	s, err := c.Start(testCtx(t), client.ExecRequest{Argv: []string{"yes", "virtkit"}})
	if err != nil {
		t.Fatal(err)
	}
	// Read a little, then stall: the agent must stop, not buffer.
	if _, err := io.ReadFull(s.Stdout(), make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	w1 := a.l.written.Load() - before
	time.Sleep(500 * time.Millisecond)
	w2 := a.l.written.Load() - before
	if w2 != w1 || w2 > 32<<20 {
		t.Fatalf("stalled reader: agent wrote %d then %d bytes; want a bounded, stopped stream", w1, w2)
	}
	// Vanish mid-stream: the command is killed and nothing is left behind.
	s.Close()
	waitFor(t, fmt.Sprintf("process %d killed", s.Pid), func() bool { return processGone(s.Pid) })
	c.Close()
	waitFor(t, "session goroutines to end", func() bool { return runtime.NumGoroutine() <= base+2 })
}

func TestAllowListAndWrapper(t *testing.T) {
	truePath, _ := exec.LookPath("true")
	echoPath, _ := exec.LookPath("echo")
	c := dial(t, startAgent(t, execserver.Config{Allow: []string{truePath, echoPath}, Wrapper: []string{echoPath, "wrapped:"}}))
	out, _, st := run(t, c, "", "true")
	if st.Code != 0 || out != "wrapped: "+truePath+"\n" {
		t.Fatalf("wrapped true: %q %+v", out, st)
	}
	_, err := c.Exec(testCtx(t), client.ExecRequest{Argv: []string{"sh", "-c", "true"}}, nil, nil, nil)
	var re *proto.RemoteError
	if !errors.As(err, &re) || re.Code != proto.CodeDenied {
		t.Fatalf("sh not on the allow-list: %v, want denied", err)
	}
}

func TestVersionMismatch(t *testing.T) {
	a := startAgent(t, execserver.Config{})
	nc, err := net.Dial("unix", strings.TrimPrefix(a.url, "unix://"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	w := proto.NewWriter(nc)
	w.WriteJSON(proto.THello, proto.Hello{Magic: proto.Magic, Version: proto.Version + 1})
	r := proto.NewReader(nc)
	f, err := r.Read()
	if err != nil || f.Type != proto.THello {
		t.Fatalf("first reply %v %v, want hello", f.Type, err)
	}
	f, err = r.Read()
	var e proto.Error
	if err != nil || f.Type != proto.TError || proto.Decode(f, &e) != nil || e.Code != proto.CodeVersion || !strings.Contains(e.Message, "version mismatch") {
		t.Fatalf("second reply %v %q %v, want a version error", f.Type, f.Payload, err)
	}
	if _, err := r.Read(); !errors.Is(err, io.EOF) {
		t.Fatalf("after version error: %v, want the agent to close", err)
	}

	// The client side reports a newer agent just as clearly.
	path := filepath.Join(t.TempDir(), "future.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		proto.NewWriter(c).WriteJSON(proto.THello, proto.Hello{Magic: proto.Magic, Version: 99, Software: "virtkit-agent v9"})
		io.Copy(io.Discard, c)
	}()
	_, err = client.Dial(testCtx(t), "unix://"+path)
	var ve *proto.VersionError
	if !errors.As(err, &ve) || ve.Theirs != 99 || !strings.Contains(err.Error(), "agent speaks v99") {
		t.Fatalf("dial a v99 agent: %v", err)
	}
}

func TestGarbageGetsErrorAndClose(t *testing.T) {
	a := startAgent(t, execserver.Config{})
	path := strings.TrimPrefix(a.url, "unix://")
	for _, garbage := range [][]byte{
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		{0xff, 0xff, 0xff, 0xff, 1},
		append(proto.AppendHeader(nil, proto.THello, 3), "{{{"...),
		append(append(proto.AppendHeader(nil, proto.THello, 37), `{"magic":"virtkit-agent","version":1}`...), 0, 0, 0, 1, 200, 0),
	} {
		nc, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		nc.Write(garbage)
		r := proto.NewReader(nc)
		var got []proto.Type
		for {
			f, err := r.Read()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					t.Errorf("garbage %q: read %v, want a clean close", garbage, err)
				}
				break
			}
			got = append(got, f.Type)
		}
		if len(got) == 0 || got[len(got)-1] != proto.TError {
			t.Errorf("garbage %q: agent sent %v, want an error frame last", garbage, got)
		}
		nc.Close()
	}
	// The agent is still fine.
	if err := dial(t, a).Ping(testCtx(t)); err != nil {
		t.Fatal(err)
	}
}

func TestCopyInOut(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	src := filepath.Join(t.TempDir(), "tree")
	os.MkdirAll(filepath.Join(src, "sub/deeper"), 0o755)
	os.WriteFile(filepath.Join(src, "a.txt"), []byte("alpha"), 0o640)
	big := make([]byte, 3<<20)
	rand.Read(big)
	os.WriteFile(filepath.Join(src, "sub/big.bin"), big, 0o600)
	os.Symlink("../a.txt", filepath.Join(src, "sub/link"))
	os.Link(filepath.Join(src, "a.txt"), filepath.Join(src, "sub/deeper/hard"))

	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(archive.Pack(pw, src)) }()
	dst := filepath.Join(t.TempDir(), "in", "guest")
	if err := c.CopyIn(testCtx(t), dst, pr); err != nil {
		t.Fatal(err)
	}
	check := func(root string) {
		t.Helper()
		if b, err := os.ReadFile(filepath.Join(root, "tree/a.txt")); err != nil || string(b) != "alpha" {
			t.Errorf("%s a.txt: %q %v", root, b, err)
		}
		if fi, err := os.Stat(filepath.Join(root, "tree/a.txt")); err != nil || fi.Mode().Perm() != 0o640 {
			t.Errorf("%s a.txt mode: %v %v", root, fi, err)
		}
		if b, err := os.ReadFile(filepath.Join(root, "tree/sub/big.bin")); err != nil || !bytes.Equal(b, big) {
			t.Errorf("%s big.bin differs: %v", root, err)
		}
		if l, err := os.Readlink(filepath.Join(root, "tree/sub/link")); err != nil || l != "../a.txt" {
			t.Errorf("%s link: %q %v", root, l, err)
		}
		a, _ := os.Stat(filepath.Join(root, "tree/a.txt"))
		h, err := os.Stat(filepath.Join(root, "tree/sub/deeper/hard"))
		if err != nil || !os.SameFile(a, h) {
			t.Errorf("%s hard link not preserved: %v", root, err)
		}
	}
	check(dst)

	var buf bytes.Buffer
	if err := c.CopyOut(testCtx(t), filepath.Join(dst, "tree"), &buf); err != nil {
		t.Fatal(err)
	}
	back := t.TempDir()
	if err := archive.Unpack(&buf, back); err != nil {
		t.Fatal(err)
	}
	check(back)

	if err := c.CopyOut(testCtx(t), "/no/such/path", io.Discard); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("copy out of a missing path: %v", err)
	}
	// An entry escaping the destination is refused and nothing is written outside.
	var evil bytes.Buffer
	tw := tar.NewWriter(&evil)
	tw.WriteHeader(&tar.Header{Name: "ok/../../escape", Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
	tw.Write([]byte("x"))
	tw.WriteHeader(&tar.Header{Name: "sym", Linkname: "/", Typeflag: tar.TypeSymlink})
	tw.WriteHeader(&tar.Header{Name: "sym/etc-escape", Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
	tw.Write([]byte("x"))
	tw.Close()
	evilDst := filepath.Join(t.TempDir(), "a", "b")
	err := c.CopyIn(testCtx(t), evilDst, &evil)
	if err == nil {
		t.Fatal("copy in through a symlink escaping the destination succeeded")
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(evilDst), "escape")); err == nil {
		t.Fatal("entry escaped the destination")
	}
	if _, err := os.Stat("/etc-escape"); err == nil {
		t.Fatal("entry escaped through a symlink")
	}
}

func TestForward(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				b, _ := io.ReadAll(conn)
				conn.Write(bytes.ToUpper(b))
			}()
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	for range 3 {
		fc, err := c.Forward(testCtx(t), port)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(fc, "hello through the agent")
		if err := fc.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(fc)
		fc.Close()
		if err != nil || string(b) != "HELLO THROUGH THE AGENT" {
			t.Fatalf("forward echo: %q %v", b, err)
		}
	}
	l.Close()
	if _, err := c.Forward(testCtx(t), port); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("forward to a closed port: %v", err)
	}
}

func TestContextCancelKills(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	ctx, cancel := context.WithCancel(context.Background())
	s, err := c.StartIO(ctx, client.ExecRequest{Argv: []string{"sleep", "1000"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := s.Wait(); !errors.Is(err, context.Canceled) {
		t.Fatalf("wait after cancel: %v", err)
	}
	waitFor(t, "sleep killed", func() bool { return processGone(s.Pid) })
}

func TestWaitReady(t *testing.T) {
	path := filepath.Join(t.TempDir(), "late.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		time.Sleep(300 * time.Millisecond)
		l, err := net.Listen("unix", path)
		if err != nil {
			return
		}
		sctx, scancel := context.WithCancel(context.Background())
		t.Cleanup(scancel)
		go execserver.New(execserver.Config{}).Serve(sctx, l)
	}()
	c, err := client.WaitReady(ctx, "unix://"+path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	short, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	if _, err := client.WaitReady(short, "unix://"+filepath.Join(t.TempDir(), "never.sock")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitReady on nothing: %v", err)
	}
}

// TestTTYSignalForeground: with a TTY, a signal goes to the terminal's foreground job, as
// Ctrl-C would — not to a job-control shell that moved the job to its own group.
func TestTTYSignalForeground(t *testing.T) {
	c := dial(t, startAgent(t, execserver.Config{}))
	s, err := c.Start(testCtx(t), client.ExecRequest{Argv: []string{"sh", "-i"}, Env: []string{"PS1=$ ", "ENV="}, TTY: true})
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(s.Stdout())
	io.WriteString(s.Stdin(), "echo g''o; sleep 100\n")
	readUntil(t, r, "go\r\n")
	time.Sleep(300 * time.Millisecond) // sleep is now the foreground job
	if err := s.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	// The job died, the shell did not: it prompts again and saw the job's status.
	readUntil(t, r, "\r\n$ ")
	io.WriteString(s.Stdin(), "echo st=$?; exit 0\n")
	readUntil(t, r, "st=130")
	go io.Copy(io.Discard, r)
	if st, err := s.Wait(); err != nil || st.Code != 0 {
		t.Fatalf("shell after its job was interrupted: %+v %v", st, err)
	}
}

// TestHeld: a held client goes to one taker only.
func TestHeld(t *testing.T) {
	var h client.Held
	if h.Take() != nil {
		t.Fatal("an empty Held gave a client")
	}
	c := &client.Client{}
	h.Put(c)
	if got := h.Take(); got != c {
		t.Fatalf("Take = %p, want %p", got, c)
	}
	if h.Take() != nil {
		t.Fatal("a second Take got the client again")
	}
}
