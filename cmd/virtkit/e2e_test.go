package main

// End-to-end tests: the virtkit binary as a user runs it, booting real microVMs (QEMU; TCG on hosts
// without usable KVM) from images converted by virtkit itself. They need root only for the
// debootstrap fixture the first time; ./test.sh provides QEMU, the kernel and the fixture.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/imagetest"
)

// vk runs the virtkit binary against one state folder.
type vk struct {
	t     *testing.T
	bin   string
	env   []string
	state string
}

func newVK(t *testing.T, extraEnv ...string) *vk {
	t.Helper()
	cmdtest.Heavy(t)
	cmdtest.Tool(t, "qemu-system-x86_64")
	bin := cmdtest.Binary(t, "virtkit")
	cmdtest.Binary(t, "virtkit-agent") // beside virtkit: convert injects it
	state := t.TempDir()
	env := append(os.Environ(), "VIRTKIT_STATE_DIR="+state, "VIRTKIT_CACHE_DIR="+filepath.Join(state, "cache"),
		"VIRTKIT_VM_KERNEL="+cmdtest.Kernel(t), "VIRTKIT_CONFIG="+filepath.Join(state, "none.toml"), "VIRTKIT_LOG_LEVEL=warn")
	os.WriteFile(filepath.Join(state, "none.toml"), nil, 0o600)
	v := &vk{t: t, bin: bin, env: append(env, extraEnv...), state: state}
	t.Cleanup(v.assertNothingLeft)
	return v
}

func (v *vk) cmd(ctx context.Context, args ...string) *exec.Cmd {
	c := exec.CommandContext(ctx, v.bin, args...)
	c.Env = v.env
	c.WaitDelay = 10 * time.Second
	return c
}

// run runs virtkit to completion and returns stdout, stderr and the exit code.
func (v *vk) run(args ...string) (string, string, int) {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c := v.cmd(ctx, args...)
	var out, errb bytes.Buffer
	c.Stdout, c.Stderr = &out, &errb
	err := c.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		v.t.Fatalf("virtkit %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// assertNothingLeft checks that no VMM or helper of this state folder survives and no VM folder
// is left.
func (v *vk) assertNothingLeft() {
	v.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		procs := procsMentioning(v.state)
		dirs, _ := filepath.Glob(filepath.Join(v.state, "vms", "*"))
		if len(procs) == 0 && len(dirs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, p := range procs {
				syscall.Kill(p, syscall.SIGKILL)
			}
			v.t.Errorf("left behind: processes %v, VM folders %v", procs, dirs)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// procsMentioning lists live processes whose command line mentions s.
func procsMentioning(s string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(s)) {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if f := strings.Fields(string(st)); len(f) > 2 && f[2] == "Z" {
				continue
			}
		}
		out = append(out, pid)
	}
	return out
}

var (
	imageOnce sync.Once
	imageRef  string
	imageErr  error
)

// testImage is an OCI layout: the Debian minbase fixture plus a layer with busybox (nc, httpd) and
// an entrypoint, so that entrypoint mode, servers and exit codes can be exercised.
func testImage(t *testing.T) string {
	t.Helper()
	deb := imagetest.DebianRootfs(t)
	bb := cmdtest.Tool(t, "busybox")
	imageOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vk-e2e-image-")
		if err != nil {
			imageErr = err
			return
		}
		bbBody, err := os.ReadFile(bb)
		if err != nil {
			imageErr = err
			return
		}
		extra := imagetest.Tar(t,
			imagetest.Dir("opt/bb/"),
			imagetest.File{Name: "opt/bb/busybox", Body: string(bbBody), Mode: 0o755},
			imagetest.File{Name: "entry.sh", Body: "#!/bin/sh\necho entry: $GREETING \"$@\"\nexit ${ENTRY_EXIT:-0}\n", Mode: 0o755},
		)
		base, err := tarball.LayerFromFile(deb)
		if err != nil {
			imageErr = err
			return
		}
		img, err := mutate.AppendLayers(empty.Image, base, imagetest.Layer(t, extra))
		if err != nil {
			imageErr = err
			return
		}
		img, err = mutate.Config(img, v1.Config{Entrypoint: []string{"/entry.sh"}, Cmd: []string{"from-cmd"},
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/bb", "GREETING=hello", "ENTRY_EXIT=0"}})
		if err != nil {
			imageErr = err
			return
		}
		p, err := layout.Write(dir, empty.Index)
		if err == nil {
			err = p.AppendImage(img)
		}
		imageErr, imageRef = err, "oci:"+dir
	})
	if imageErr != nil {
		t.Fatalf("test image: %v", imageErr)
	}
	return imageRef
}

func TestRunExitCodesAndOutput(t *testing.T) {
	v := newVK(t)
	img := testImage(t)
	out, errOut, code := v.run("run", "--net", "none", img, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
	if code != 7 || out != "out\n" || !strings.Contains(errOut, "err") {
		t.Fatalf("exit %d, stdout %q, stderr %q; want 7, out, err", code, out, errOut)
	}
	// Killed by a signal: 128+N, as a shell reports it.
	if _, errOut, code := v.run("run", "--net", "none", img, "--", "sh", "-c", "kill -TERM $$"); code != 143 {
		t.Fatalf("signalled command: exit %d (stderr %s), want 143", code, errOut)
	}
	// No command: the image's entrypoint and cmd with its env.
	if out, errOut, code := v.run("run", "--net", "none", img); code != 0 || out != "entry: hello from-cmd\n" {
		t.Fatalf("entrypoint: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	// stdin streams with -i; env and workdir apply.
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c := v.cmd(ctx, "run", "-i", "--net", "none", "-e", "X=42", "-w", "/tmp", img, "--", "sh", "-c", `cat; echo "$X $(pwd)"`)
	c.Stdin = strings.NewReader("piped\n")
	b, err := c.Output()
	if err != nil || string(b) != "piped\n42 /tmp\n" {
		t.Fatalf("stdin/env/workdir: %q, %v", b, err)
	}
	// A command that does not exist: 127, like a shell.
	if _, _, code := v.run("run", "--net", "none", img, "--", "/no/such/thing"); code != 127 {
		t.Fatalf("missing command: exit %d, want 127", code)
	}
}

func TestRunForwardsSignals(t *testing.T) {
	v := newVK(t)
	img := testImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c := v.cmd(ctx, "run", "--net", "none", img, "--", "sh", "-c", `trap 'echo got-int; exit 42' INT; echo ready; while :; do sleep 0.2; done`)
	stdout, _ := c.StdoutPipe()
	var errb bytes.Buffer
	c.Stderr = &errb
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(stdout)
	line, err := r.ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("waiting for ready: %q, %v; stderr %s", line, err, errb.String())
	}
	c.Process.Signal(syscall.SIGINT)
	rest, _ := io.ReadAll(r)
	err = c.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 42 || string(rest) != "got-int\n" {
		t.Fatalf("after SIGINT: %v, output %q, stderr %s; want exit 42 and got-int", err, rest, errb.String())
	}
}

// daemon starts `virtkit serve` and returns a function that stops it with sig.
func (v *vk) daemon() (stop func(sig syscall.Signal) error) {
	v.t.Helper()
	c := v.cmd(context.Background(), "serve")
	var logb cmdtest.Buffer
	c.Stdout, c.Stderr = &logb, &logb
	v.t.Cleanup(func() {
		if v.t.Failed() {
			v.t.Logf("virtkit serve log:\n%s", logb.String())
		}
	})
	if err := c.Start(); err != nil {
		v.t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	ep := filepath.Join(v.state, "broker", "endpoint.json")
	for i := 0; ; i++ {
		if _, err := os.Stat(ep); err == nil {
			break
		}
		select {
		case err := <-done:
			v.t.Fatalf("serve exited: %v\n%s", err, logb.String())
		case <-time.After(50 * time.Millisecond):
		}
		if i > 600 {
			c.Process.Kill()
			v.t.Fatalf("serve did not come up:\n%s", logb.String())
		}
	}
	var once sync.Once
	stop = func(sig syscall.Signal) error {
		var err error
		once.Do(func() {
			c.Process.Signal(sig)
			select {
			case err = <-done:
			case <-time.After(90 * time.Second):
				c.Process.Kill()
				err = fmt.Errorf("serve did not stop on %v:\n%s", sig, logb.String())
			}
		})
		return err
	}
	v.t.Cleanup(func() { stop(syscall.SIGTERM) })
	return stop
}

func TestDaemonVMsNetworkAndFaults(t *testing.T) {
	// A host server the guests may reach only because this daemon allows host loopback.
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "host-says-hi") })}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	defer srv.Close()
	port := l.Addr().(*net.TCPAddr).Port

	v := newVK(t, "VIRTKIT_NET_ALLOW_HOST_LOOPBACK=true")
	img := testImage(t)
	stop := v.daemon()

	// A free host port for vm1's -p forward.
	fl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fwdPort := fl.Addr().(*net.TCPAddr).Port
	fl.Close()

	// Four VMs at once, two of them serving.
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	for i := 1; i <= 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			args := []string{"run", "-d", "--name", fmt.Sprintf("vm%d", i)}
			if i == 1 {
				args = append(args, "-p", fmt.Sprintf("127.0.0.1:%d:7001", fwdPort))
			}
			out, errOut, code := v.run(append(args, img, "--", "true")...)
			if code != 0 {
				errs <- fmt.Sprintf("vm%d: exit %d: %s %s", i, code, out, errOut)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	// A second VM of a running VM's name is refused at once, and the running one is untouched.
	if out, errOut, code := v.run("run", "-d", "--name", "vm2", img, "--", "true"); code == 0 || !strings.Contains(errOut, "already running") {
		t.Errorf("run -d --name vm2 again: exit %d, %q %q; want a refusal", code, out, errOut)
	}
	if out, _, code := v.run("vm", "exec", "vm2", "--", "true"); code != 0 {
		t.Errorf("vm2 after the refused launch: exec exit %d: %s", code, out)
	}
	// Entrypoint mode: the image's own command runs as the VM's job; the VM powers off after it
	// and its exit code reaches the event log.
	if out, errOut, code := v.run("run", "-d", "--name", "ep", img); code != 0 || strings.TrimSpace(out) != "ep" {
		t.Fatalf("run -d (entrypoint mode): exit %d, %q %s", code, out, errOut)
	}
	waitPhase(t, v, "ep", "stopped")
	js, _, _ := v.run("vm", "ls", "-a", "-o", "json")
	var rows []struct {
		ID       string `json:"id"`
		ExitCode int    `json:"exit_code"`
		Reason   string `json:"reason"`
	}
	json.Unmarshal([]byte(js), &rows)
	for _, r := range rows {
		if r.ID == "ep" && (r.ExitCode != 0 || r.Reason != "powered off") {
			t.Fatalf("entrypoint VM ended with %+v, want exit 0, powered off", r)
		}
	}

	out, _, _ := v.run("vm", "ls")
	for i := 1; i <= 4; i++ {
		if !strings.Contains(out, fmt.Sprintf("vm%d", i)) {
			t.Fatalf("vm ls lacks vm%d:\n%s", i, out)
		}
	}
	// name.lan between VMs, TCP between VMs, egress to the host through the gateway.
	if _, errOut, code := v.run("vm", "exec", "vm1", "--", "sh", "-c", "setsid busybox nc -l -p 7000 -e echo from-vm1 </dev/null >/dev/null 2>&1 & sleep 0.5"); code != 0 {
		t.Fatalf("server in vm1: %d %s", code, errOut)
	}
	if out, errOut, code := v.run("vm", "exec", "vm2", "--", "sh", "-c", "getent hosts vm1.lan && busybox nc vm1.lan 7000 </dev/null"); code != 0 || !strings.Contains(out, "from-vm1") {
		t.Fatalf("vm2 → vm1.lan:7000: exit %d, %q %s", code, out, errOut)
	}
	// -p: a host port forwarded to a guest port.
	if _, errOut, code := v.run("vm", "exec", "vm1", "--", "sh", "-c", "setsid busybox nc -l -p 7001 -e echo fwd-ok </dev/null >/dev/null 2>&1 & sleep 0.5"); code != 0 {
		t.Fatalf("server in vm1: %d %s", code, errOut)
	}
	fc, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", fwdPort), 10*time.Second)
	if err != nil {
		t.Fatalf("-p forward: %v", err)
	}
	fc.SetDeadline(time.Now().Add(20 * time.Second))
	got, _ := io.ReadAll(fc)
	fc.Close()
	if string(got) != "fwd-ok\n" {
		t.Fatalf("-p forward read %q, want fwd-ok", got)
	}
	if out, errOut, code := v.run("vm", "exec", "vm3", "--", "busybox", "wget", "-q", "-O", "-", fmt.Sprintf("http://10.77.0.1:%d/", port)); code != 0 || out != "host-says-hi" {
		t.Fatalf("egress to the host: exit %d, %q %s", code, out, errOut)
	}
	// Cloud metadata stays unreachable whatever the loopback rule.
	if _, _, code := v.run("vm", "exec", "vm3", "--", "busybox", "wget", "-q", "-T", "3", "-O", "-", "http://169.254.169.254/"); code == 0 {
		t.Fatal("guest reached 169.254.169.254")
	}

	// The VMM dies under a running exec: a clear error, the VM marked failed, nothing left behind.
	pid := vmmPID(t, v, "vm4")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := v.cmd(ctx, "vm", "exec", "vm4", "--", "sleep", "600")
	var errb bytes.Buffer
	c.Stderr = &errb
	c.Start()
	time.Sleep(time.Second)
	syscall.Kill(pid, syscall.SIGKILL)
	err = c.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 || errb.Len() == 0 {
		t.Fatalf("exec into a dying VM: %v, stderr %q", err, errb.String())
	}
	waitPhase(t, v, "vm4", "failed")

	// kill -9 the daemon while VMs run: their VMMs die with it; a restart reconciles.
	if err := stop(syscall.SIGKILL); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Logf("serve after SIGKILL: %v", err)
	}
	for _, name := range []string{"vm1", "vm2", "vm3"} {
		for deadline := time.Now().Add(10 * time.Second); ; {
			if len(procsMentioning(filepath.Join(v.state, "vms", name)+"/")) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s's processes outlived the daemon: %v", name, procsMentioning(filepath.Join(v.state, "vms", name)+"/"))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	os.Remove(filepath.Join(v.state, "broker", "endpoint.json")) // a SIGKILLed daemon cannot clean it
	v.daemon()
	for _, name := range []string{"vm1", "vm2", "vm3"} {
		waitPhase(t, v, name, "stopped")
	}
}

func vmmPID(t *testing.T, v *vk, name string) int {
	b, err := os.ReadFile(filepath.Join(v.state, "vms", name, "vmm.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

func waitPhase(t *testing.T, v *vk, name, phase string) {
	t.Helper()
	var out string
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		out, _, _ = v.run("vm", "ls", "-a")
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) > 1 && f[0] == name && f[1] == phase {
				return
			}
		}
	}
	t.Fatalf("%s never reached phase %s:\n%s", name, phase, out)
}

func TestRunSharesFolders(t *testing.T) {
	v := newVK(t)
	img := testImage(t)
	rw, ro := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(rw, "from-host"), []byte("host data\n"), 0o644)
	os.WriteFile(filepath.Join(ro, "keep"), []byte("keep\n"), 0o644)
	out, errOut, code := v.run("run", "--net", "none", "-v", rw+":/src", "-v", ro+":/ro:ro", img, "--", "sh", "-c",
		`cat /src/from-host && echo guest data > /src/from-guest && mkdir -p /src/d/e && mv /src/from-guest /src/d/e/moved && cat /ro/keep && ! touch /ro/nope 2>/dev/null && echo ro-refused`)
	if code != 0 || out != "host data\nkeep\nro-refused\n" {
		t.Fatalf("shares: exit %d, stdout %q, stderr %s", code, out, errOut)
	}
	if b, err := os.ReadFile(filepath.Join(rw, "d", "e", "moved")); err != nil || string(b) != "guest data\n" {
		t.Fatalf("the guest's write is not on the host: %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(ro, "nope")); err == nil {
		t.Fatal("a read-only share was written")
	}
}
