// Package lantest gives switch tests and benchmarks real Linux pieces to play guests and servers:
// network namespaces (created with iproute2 and removed on cleanup), veth links into them, and
// processes started inside them that are killed when the test ends, even when it fails.
//
// Everything is tied to a testing.TB and cleaned up by t.Cleanup; nothing is shared between tests.
package lantest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

var seq atomic.Int64

// Netns is a network namespace made for one test.
type Netns struct {
	Name string
	t    testing.TB
}

// NewNetns creates a namespace with its loopback up and a private resolv.conf (so that DHCP
// clients run inside it never touch the host's), removed when the test ends.
func NewNetns(t testing.TB, hint string) *Netns {
	t.Helper()
	cmdtest.RequireRoot(t)
	ipbin := cmdtest.Tool(t, "ip")
	name := fmt.Sprintf("vk%s%d-%d", hint, os.Getpid()%100000, seq.Add(1))
	if out, err := exec.Command(ipbin, "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("lantest: ip netns add %s: %v\n%s", name, err, out)
	}
	ns := &Netns{Name: name, t: t}
	etc := filepath.Join("/etc/netns", name)
	t.Cleanup(func() {
		// Kill anything left in the namespace, then remove it.
		if out, err := exec.Command(ipbin, "netns", "pids", name).Output(); err == nil {
			for _, f := range strings.Fields(string(out)) {
				var pid int
				fmt.Sscan(f, &pid)
				if pid > 0 {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		exec.Command(ipbin, "netns", "del", name).Run()
		os.RemoveAll(etc)
	})
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte("# lantest placeholder\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ns.MustRun("ip", "link", "set", "lo", "up")
	return ns
}

// ResolvConf is the file `ip netns exec` binds over /etc/resolv.conf inside the namespace.
func (n *Netns) ResolvConf() string { return filepath.Join("/etc/netns", n.Name, "resolv.conf") }

func (n *Netns) command(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// Run runs a command in the namespace with a timeout and returns its combined output.
func (n *Netns) Run(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c := n.command(ctx, args...)
	c.WaitDelay = time.Second
	out, err := c.CombinedOutput()
	return string(out), err
}

// MustRun is Run that fails the test on error.
func (n *Netns) MustRun(args ...string) string {
	n.t.Helper()
	out, err := n.Run(30*time.Second, args...)
	if err != nil {
		n.t.Fatalf("lantest: in %s: %q: %v\n%s", n.Name, args, err, out)
	}
	return out
}

// Proc is a background process in a namespace.
type Proc struct {
	Cmd *exec.Cmd
	out *cmdtest.Buffer
}

// Start starts a background process in the namespace; it is killed and reaped at cleanup.
func (n *Netns) Start(args ...string) *Proc {
	n.t.Helper()
	c := n.command(context.Background(), args...)
	out := &cmdtest.Buffer{}
	c.Stdout, c.Stderr = out, out
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.Start(); err != nil {
		n.t.Fatalf("lantest: start %q in %s: %v", args, n.Name, err)
	}
	p := &Proc{Cmd: c, out: out}
	n.t.Cleanup(func() {
		syscall.Kill(-c.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if n.t.Failed() {
			n.t.Logf("output of %q in %s:\n%s", args, n.Name, out.String())
		}
	})
	return p
}

// Output returns what the process printed so far.
func (p *Proc) Output() string { return p.out.String() }

// Veth links the host (root namespace) to n: hostAddr and nsAddr are CIDRs such as 10.98.1.1/24.
func (n *Netns) Veth(hostAddr, nsAddr string) {
	n.t.Helper()
	host := fmt.Sprintf("vkh%d", seq.Add(1))
	peer := fmt.Sprintf("vkp%d", seq.Add(1))
	if out, err := exec.Command("ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", n.Name).CombinedOutput(); err != nil {
		n.t.Fatalf("lantest: veth: %v\n%s", err, out)
	}
	n.t.Cleanup(func() { exec.Command("ip", "link", "del", host).Run() })
	for _, a := range [][]string{{"addr", "add", hostAddr, "dev", host}, {"link", "set", host, "up"}} {
		if out, err := exec.Command("ip", a...).CombinedOutput(); err != nil {
			n.t.Fatalf("lantest: ip %q: %v\n%s", a, err, out)
		}
	}
	n.MustRun("ip", "addr", "add", nsAddr, "dev", peer)
	n.MustRun("ip", "link", "set", peer, "up")
}

// WaitFor polls cond until it returns nil or timeout passes, then fails with its last error.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
