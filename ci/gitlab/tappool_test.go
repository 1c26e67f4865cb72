package gitlab_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/imagetest"
)

// netns is a network namespace made for a test, with an operator's network in it: a bridge with
// an address, taps on it and a DHCP server. Everything is removed in t.Cleanup.
type netns struct {
	t    *testing.T
	name string
}

func (n *netns) run(args ...string) {
	n.t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		n.t.Fatalf("ip netns exec %s %s: %v\n%s", n.name, strings.Join(args, " "), err, out)
	}
}

// start runs a long-lived process in the namespace, killed at cleanup.
func (n *netns) start(logPath string, args ...string) *exec.Cmd {
	n.t.Helper()
	logf, err := os.Create(logPath)
	if err != nil {
		n.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	n.t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGKILL)
		<-done
	})
	return cmd
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	cmdtest.RequireRoot(t)
	cmdtest.Tool(t, "ip")
	n := &netns{t: t, name: fmt.Sprintf("vkpool%d", os.Getpid())}
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v\n%s", err, out)
	}
	// Registered first, so it runs last: after every process in the namespace is gone. Deleting
	// the namespace removes its bridge and taps.
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v\n%s", n.name, err, out)
		}
	})
	return n
}

// TestTapPoolOnMicroVMs: net.mode = "pool". In a network namespace standing in for the operator's
// network (a bridge, two pre-created taps on it, busybox udhcpd and a TCP server), `virtkit serve`
// and the hooks run as GitLab Runner would run them there. Each job VM leases a tap of its own,
// gets its address from the operator's DHCP server with its kernel NIC (no relay) and reaches the
// server; a third job finds the pool exhausted (a system failure that says so); the taps come back
// at cleanup.
func TestTapPoolOnMicroVMs(t *testing.T) {
	cmdtest.Heavy(t)
	kernel := cmdtest.Kernel(t)
	cmdtest.Tool(t, "qemu-system-x86_64")
	bb := cmdtest.Tool(t, "busybox")
	tarball := imagetest.DebianRootfs(t) // debootstrap once, cached
	bin := cmdtest.Binary(t, "virtkit")
	cmdtest.Binary(t, "virtkit-agent")
	ns := newNetns(t)
	root := t.TempDir()

	// The operator's network: what deploy/tap-pool.sh sets up on a real host.
	ns.run("ip", "link", "set", "lo", "up")
	ns.run("ip", "link", "add", "vkbr0", "type", "bridge", "forward_delay", "0")
	ns.run("ip", "addr", "add", "192.168.77.1/24", "dev", "vkbr0")
	ns.run("ip", "link", "set", "vkbr0", "up")
	for _, tap := range []string{"vkp0", "vkp1"} {
		ns.run("ip", "tuntap", "add", tap, "mode", "tap")
		ns.run("ip", "link", "set", tap, "master", "vkbr0", "up")
	}
	conf := filepath.Join(root, "udhcpd.conf")
	writeFile(t, conf, fmt.Sprintf("start 192.168.77.100\nend 192.168.77.150\ninterface vkbr0\nlease_file %s\npidfile %s\nopt subnet 255.255.255.0\nopt router 192.168.77.1\nopt dns 192.168.77.1\nopt lease 600\n",
		filepath.Join(root, "udhcpd.leases"), filepath.Join(root, "udhcpd.pid")))
	writeFile(t, filepath.Join(root, "udhcpd.leases"), "")
	ns.start(filepath.Join(root, "udhcpd.log"), bb, "udhcpd", "-f", conf)
	ns.start(filepath.Join(root, "server.log"), bb, "nc", "-ll", "-p", "8080", "-e", bb, "echo", "operator-server-says-hi")

	state := filepath.Join(root, "state")
	cfg := filepath.Join(root, "virtkit.toml")
	writeFile(t, cfg, fmt.Sprintf(`state_dir = %q
host = "vk-pool"
[vm]
kernel = %q
memory_mib = 256
capacity = 3
[ci]
allowed_registries = ["tar:%s"]
job_timeout_sec = 900
[net]
mode = "pool"
taps = ["vkp0", "vkp1"]
`, state, kernel, filepath.Dir(tarball)))
	serveLog := filepath.Join(root, "serve.log")
	serve := exec.Command("ip", "netns", "exec", ns.name, bin, "serve", "--workers", "projector,heartbeat,ci", "--log-level", "debug")
	serve.Env = append(os.Environ(), "VIRTKIT_CONFIG="+cfg)
	logf, err := os.Create(serveLog)
	if err != nil {
		t.Fatal(err)
	}
	serve.Stdout, serve.Stderr = logf, logf
	serve.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	served := make(chan struct{})
	go func() { serve.Wait(); close(served) }()
	t.Cleanup(func() {
		serve.Process.Signal(syscall.SIGTERM)
		select {
		case <-served:
		case <-time.After(60 * time.Second):
			serve.Process.Kill()
			<-served
		}
		if t.Failed() {
			b, _ := os.ReadFile(serveLog)
			if len(b) > 30000 {
				b = b[len(b)-30000:]
			}
			t.Logf("serve log:\n%s", b)
		}
	})
	waitFor(t, "virtkit serve", 60*time.Second, func() bool {
		ep, err := broker.ReadEndpoint(state)
		return err == nil && ep.PID == serve.Process.Pid
	})

	f := &fixture{t: t, bin: bin, image: "tar:" + tarball, imgDir: filepath.Dir(tarball), runner: cfg, hosts: map[string]*host{},
		wrap: []string{"ip", "netns", "exec", ns.name}}
	probe := `addr=$(grep -o '192\.168\.77\.1[0-9][0-9]' /proc/net/fib_trie | head -1)
echo "address $addr"
grep nameserver /etc/resolv.conf
procs=$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' ' ')
case "$procs" in *"net --connect"*) echo relay-running;; esac
case "$procs" in *"net --nic eth0"*) echo nic-configured-by-agent;; esac
exec 3<>/dev/tcp/192.168.77.1/8080
read -r line <&3
echo "server: $line"
`
	j1, j2 := f.job(501, nil), f.job(502, nil)
	check(t, "prepare 1", j1.hook("prepare"), 0)
	check(t, "prepare 2", j2.hook("prepare"), 0)
	r1 := j1.run("build_script", probe)
	r2 := j2.run("build_script", probe)
	t.Logf("job 1:\n%s\njob 2:\n%s", r1.stdout, r2.stdout)
	for i, r := range []result{r1, r2} {
		check(t, fmt.Sprintf("job %d on the operator's network", i+1), r, 0, "address 192.168.77.1", "nameserver 192.168.77.1", "nic-configured-by-agent", "server: operator-server-says-hi")
		if strings.Contains(r.stdout, "relay-running") {
			t.Fatalf("job %d: the agent started the switch relay on a tap VM", i+1)
		}
	}
	a1, a2 := addrOf(r1.stdout), addrOf(r2.stdout)
	if a1 == a2 {
		t.Fatalf("both jobs have address %s", a1)
	}
	// Both taps are leased: a third job fails as a system failure that names the exhausted pool.
	j3 := f.job(503, nil)
	check(t, "prepare with the pool exhausted", j3.hook("prepare"), systemFailure, "no free tap")
	check(t, "cleanup 3", j3.hook("cleanup"), 0)
	// Cleanup returns the taps: the next job gets one.
	check(t, "cleanup 1", j1.hook("cleanup"), 0)
	j4 := f.job(504, nil)
	check(t, "prepare after a tap came back", j4.hook("prepare"), 0)
	check(t, "job 4 on the operator's network", j4.run("build_script", probe), 0, "server: operator-server-says-hi")
	check(t, "cleanup 4", j4.hook("cleanup"), 0)
	check(t, "cleanup 2", j2.hook("cleanup"), 0)
	waitFor(t, "no CI VM left", 30*time.Second, func() bool {
		ents, _ := os.ReadDir(filepath.Join(state, "ci", "vms"))
		return len(ents) == 0
	})
	if p := processesUnder(filepath.Join(state, "ci")); len(p) != 0 {
		t.Fatalf("processes left: %v", p)
	}
}

func addrOf(out string) string {
	for _, l := range strings.Split(out, "\n") {
		if a, ok := strings.CutPrefix(l, "address "); ok {
			return a
		}
	}
	return ""
}
