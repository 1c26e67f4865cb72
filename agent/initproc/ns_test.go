package initproc_test

import (
	"bytes"
	"context"
	"encoding/base64"
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

	"github.com/virtkit/virtkit/agent/agenttest"
	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/cmd/cmdtest"
)

func sh(t *testing.T, c *client.Client, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	st, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"sh", "-c", script}}, nil, &out, &errb)
	if err != nil || st.Code != 0 {
		t.Fatalf("sh -c %q: %+v %v; stderr %s", script, st, err, errb.String())
	}
	return out.String()
}

const agentConf = `# written by the test
virtkit.mode=agent
virtkit.hostname=vk-test
virtkit.net=none
listen=unix:///.virtkit/agent.sock
virtkit.dns=10.0.2.3
`

func TestInitAgentMode(t *testing.T) {
	root := agenttest.BusyboxRoot(t)
	g := agenttest.BootNS(t, root, agentConf)
	c := g.Dial(t)

	mounts := sh(t, c, "cat /proc/mounts")
	for _, want := range []string{" /proc proc ", " /sys sysfs ", " /dev devtmpfs ", " /dev/pts devpts ", " /dev/shm tmpfs ", " /run tmpfs ", " /tmp tmpfs ", " /sys/fs/cgroup cgroup2 "} {
		if !strings.Contains(mounts, want) {
			t.Errorf("mount %q missing:\n%s", want, mounts)
		}
	}
	if got := sh(t, c, "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; cat /sys/class/net/lo/flags; grep vk-test /etc/hosts; cat /etc/resolv.conf"); !strings.Contains(got, "vk-test\n/sbin/virtkit-agent \n0x9\n127.0.1.1\tvk-test\nnameserver 10.0.2.3\n") {
		t.Errorf("identity: %q", got)
	}
	// A terminal works in the Guest's own devpts.
	var out bytes.Buffer
	st, err := c.Exec(context.Background(), client.ExecRequest{Argv: []string{"sh", "-c", "tty; stty size"}, TTY: true, Rows: 33, Cols: 77}, nil, &out, nil)
	if err != nil || st.Code != 0 || !strings.Contains(out.String(), "/dev/pts/0") || !strings.Contains(out.String(), "33 77") {
		t.Errorf("tty in the Guest: %q %+v %v", out.String(), st, err)
	}

	// Orphans re-parented to PID 1 are reaped.
	sh(t, c, "for i in 1 2 3 4 5 6 7 8 9 10; do (sleep 0.2 &) ; done")
	time.Sleep(1500 * time.Millisecond)
	procs := sh(t, c, "cat /proc/[0-9]*/stat")
	if strings.Contains(procs, ") Z ") || strings.Contains(procs, "(sleep)") {
		t.Errorf("zombies or orphans left:\n%s", procs)
	}

	in, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, m := range in.Boot {
		names[m.Name] = true
	}
	if !in.PID1 || in.Mode != "agent" || in.Hostname != "vk-test" || !names["mounts"] || !names["serving"] {
		t.Errorf("info: %+v", in)
	}
	if !strings.Contains(g.Con.String(), "virtkit: serving on unix:///.virtkit/agent.sock (boot: kernel") {
		t.Errorf("no boot timings on the console:\n%s", g.Con.String())
	}

	// Orderly shutdown: running sessions end, init powers off.
	s, err := c.StartIO(context.Background(), client.ExecRequest{Argv: []string{"sleep", "1000"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Shutdown(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	agenttest.PoweredOff(t, g.Wait(t))
	if st, err := s.Wait(); err == nil && st.Signal == 0 {
		t.Errorf("session survived shutdown: %+v", st)
	}
	for _, want := range []string{"virtkit: stopping all processes", "virtkit: power off"} {
		if !strings.Contains(g.Con.String(), want) {
			t.Errorf("console lacks %q:\n%s", want, g.Con.String())
		}
	}
}

func writeImage(t *testing.T, root, js string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(root, ".virtkit/image.json"), []byte(js), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestInitEntrypointOverlay(t *testing.T) {
	root := agenttest.BusyboxRoot(t)
	writeImage(t, root, `{"entrypoint":["/bin/sh","-c"],"cmd":["echo FOO=$FOO; pwd; id -u; echo data > /etc/written && grep ' / overlay ' /proc/mounts >/dev/null && echo overlay-root; exit 7"],"env":["FOO=bar"],"workdir":"/tmp","user":"nobody"}`)
	os.Chmod(filepath.Join(root, "etc"), 0o777) // nobody may write /etc in the overlay
	g := agenttest.BootNS(t, root, "virtkit.overlay=tmpfs\nvirtkit.net=none\nvirtkit.listen=unix:///run/agent.sock\n")
	agenttest.PoweredOff(t, g.Wait(t))
	con := g.Con.String()
	// init's own "virtkit: …" lines share the console and may land between the entrypoint's.
	var entry strings.Builder
	for _, line := range strings.SplitAfter(con, "\n") {
		if !strings.HasPrefix(line, "virtkit: ") {
			entry.WriteString(line)
		}
	}
	if want := "FOO=bar\n/tmp\n65534\noverlay-root\n"; !strings.Contains(entry.String(), want) {
		t.Errorf("the entrypoint's output lacks %q:\n%s", want, con)
	}
	for _, want := range []string{"virtkit: exit-code 7\n", "virtkit: power off"} {
		if !strings.Contains(con, want) {
			t.Errorf("console lacks %q:\n%s", want, con)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "etc/written")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the Guest's write reached the read-only base: %v", err)
	}
}

func TestInitEntrypointSignalsAndWait(t *testing.T) {
	root := agenttest.BusyboxRoot(t)
	writeImage(t, root, `{"entrypoint":["sh","-c","trap 'echo got-term; exit 5' TERM; echo started; while :; do sleep 0.05; done"]}`)
	// The exit code also goes to an endpoint of the host's choosing (virtkit.exitcode).
	exitLn, err := net.Listen("unix", filepath.Join(root, ".virtkit/exit.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer exitLn.Close()
	exitLine := make(chan string, 1)
	go func() {
		c, err := exitLn.Accept()
		if err != nil {
			exitLine <- err.Error()
			return
		}
		b, _ := io.ReadAll(c)
		exitLine <- string(b)
	}()
	g := agenttest.BootNS(t, root, "virtkit.net=none\nvirtkit.listen=unix:///.virtkit/agent.sock\nvirtkit.linger=1s\nvirtkit.exitcode=unix:///.virtkit/exit.sock\n")
	c := g.Dial(t)
	g.Con.WaitFor(t, "started\n")
	type res struct {
		st  client.ExitStatus
		err error
	}
	waited := make(chan res, 1)
	go func() {
		st, err := c.WaitEntrypoint(context.Background())
		waited <- res{st, err}
	}()
	time.Sleep(100 * time.Millisecond)
	// A signal to PID 1 is forwarded to the entrypoint.
	if err := g.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	r := <-waited
	if r.err != nil || r.st.Code != 5 {
		t.Fatalf("wait: %+v %v, want exit code 5", r.st, r.err)
	}
	in, err := c.Info(context.Background())
	if err != nil || in.Entrypoint == nil || in.Entrypoint.Running || in.Entrypoint.Exit == nil || in.Entrypoint.Exit.Code != 5 {
		t.Fatalf("info after exit: %+v %v", in.Entrypoint, err)
	}
	agenttest.PoweredOff(t, g.Wait(t))
	con := g.Con.String()
	if !strings.Contains(con, "got-term\n") || !strings.Contains(con, "virtkit: exit-code 5\n") {
		t.Errorf("console:\n%s", con)
	}
	if l := <-exitLine; l != "virtkit: exit-code 5\n" {
		t.Errorf("exit code endpoint got %q", l)
	}
}

func TestInitNotPID1(t *testing.T) {
	agent := cmdtest.Binary(t, "virtkit-agent")
	out, err := exec.Command(agent, "init").CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "not PID 1") {
		t.Fatalf("init outside PID 1: %v %s", err, out)
	}
}

// TestInitOverlayDisk stacks a real ext4 block device (a loop device standing in for the VM's
// /dev/vdb) over the read-only base; the Guest's writes land on it and it is clean afterwards.
func TestInitOverlayDisk(t *testing.T) {
	root := agenttest.BusyboxRoot(t)
	mkfs := cmdtest.Tool(t, "mkfs.ext4")
	losetup := cmdtest.Tool(t, "losetup")
	e2fsck := cmdtest.Tool(t, "e2fsck")
	debugfs := cmdtest.Tool(t, "debugfs")
	img := filepath.Join(t.TempDir(), "rw.ext4")
	if out, err := exec.Command(mkfs, "-q", "-F", img, "32M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v %s", err, out)
	}
	out, err := exec.Command(losetup, "-f", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command(losetup, "-d", dev).Run() })

	writeImage(t, root, `{"entrypoint":["sh","-c","echo persisted > /etc/written; rm /etc/group; grep -q '^/dev/loop' /proc/mounts && echo rw-disk-mounted; exit 0"]}`)
	g := agenttest.BootNS(t, root, "virtkit.overlay="+dev+"\nvirtkit.net=none\nvirtkit.listen=unix:///run/agent.sock\n")
	agenttest.PoweredOff(t, g.Wait(t))
	if con := g.Con.String(); !strings.Contains(con, "rw-disk-mounted\n") || !strings.Contains(con, "virtkit: exit-code 0\n") {
		t.Fatalf("console:\n%s", con)
	}
	if _, err := os.Stat(filepath.Join(root, "etc/group")); err != nil {
		t.Errorf("the Guest's delete reached the base: %v", err)
	}
	// The namespace is gone, so the disk is unmounted: it must be clean and hold the writes.
	waitLoopFree(t, dev)
	if out, err := exec.Command(e2fsck, "-fn", dev).CombinedOutput(); err != nil {
		t.Errorf("e2fsck after shutdown: %v\n%s", err, out)
	}
	out, err = exec.Command(debugfs, "-R", "cat /upper/etc/written", dev).Output()
	if err != nil || string(out) != "persisted\n" {
		t.Errorf("upper layer content: %q %v", out, err)
	}
	out, _ = exec.Command(debugfs, "-R", "stat /upper/etc/group", dev).CombinedOutput()
	if !strings.Contains(string(out), "Type: character special") {
		t.Errorf("no whiteout for the deleted file in the upper layer:\n%s", out)
	}
}

// waitLoopFree waits until no mount uses dev (the dying namespace releases it asynchronously).
func waitLoopFree(t *testing.T, dev string) {
	t.Helper()
	name := filepath.Base(dev)
	for range 200 {
		holders, _ := os.ReadDir("/sys/block/" + name + "/holders")
		b, _ := os.ReadFile("/proc/self/mountinfo")
		if len(holders) == 0 && !strings.Contains(string(b), dev) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestInitSystemdHandOff checks that systemd mode writes the agent's runtime units and execs the
// configured systemd as PID 1 (here a script that shows what it got and powers off), and that a
// missing systemd leaves the Guest serving in agent mode.
func TestInitSystemdHandOff(t *testing.T) {
	root := agenttest.BusyboxRoot(t)
	script := "#!/bin/sh\ncat /run/systemd/system/virtkit-agent.service\nls /run/systemd/system/sysinit.target.wants\necho \"systemd-pid=$$\"\nexec poweroff -f\n"
	if err := os.WriteFile(filepath.Join(root, "bin/fake-systemd"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	g := agenttest.BootNS(t, root, "virtkit.mode=systemd\nvirtkit.systemd=/bin/fake-systemd\nvirtkit.net=none\nvirtkit.listen=unix:///.virtkit/agent.sock\nvirtkit.allow=/bin/true\n")
	agenttest.PoweredOff(t, g.Wait(t))
	con := g.Con.String()
	for _, want := range []string{`ExecStart="/sbin/virtkit-agent" "serve" "--listen" "unix:///.virtkit/agent.sock" "--allow" "/bin/true"`, "virtkit-agent.service\n", "systemd-pid=1\n"} {
		if !strings.Contains(con, want) {
			t.Errorf("console lacks %q:\n%s", want, con)
		}
	}

	root = agenttest.BusyboxRoot(t)
	g = agenttest.BootNS(t, root, "virtkit.mode=systemd\nvirtkit.systemd=/no/systemd\nvirtkit.net=none\nvirtkit.listen=unix:///.virtkit/agent.sock\n")
	c := g.Dial(t)
	in, err := c.Info(context.Background())
	if err != nil || in.Mode != "agent" {
		t.Fatalf("fallback: %+v %v", in, err)
	}
	if !strings.Contains(g.Con.String(), "staying in agent mode") {
		t.Errorf("console:\n%s", g.Con.String())
	}
	c.Shutdown(context.Background(), true)
	agenttest.PoweredOff(t, g.Wait(t))
}

// installDynamic copies a host program and the shared libraries it needs into root.
func installDynamic(t *testing.T, root, prog string) {
	t.Helper()
	out, err := exec.Command("ldd", prog).Output()
	if err != nil {
		t.Fatalf("ldd %s: %v", prog, err)
	}
	files := []string{prog}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				files = append(files, f)
			}
		}
	}
	for _, f := range files {
		dst := filepath.Join(root, f)
		if _, err := os.Stat(dst); err == nil {
			continue
		}
		os.MkdirAll(filepath.Dir(dst), 0o755)
		real, err := filepath.EvalSymlinks(f)
		if err != nil {
			t.Fatal(err)
		}
		agenttest.CopyFile(t, real, dst)
	}
}

// TestInitSSH gives the Guest an authorized key on its configuration, lets init start the
// image's sshd with it, and logs in with the host's ssh through `virtkit-agent connect` as the
// ProxyCommand (Guest port 22 through the agent).
func TestInitSSH(t *testing.T) {
	root := agenttest.BusyboxRoot(t)
	sshd := cmdtest.Tool(t, "sshd")
	keygen := cmdtest.Tool(t, "ssh-keygen")
	sshc := cmdtest.Tool(t, "ssh")
	installDynamic(t, root, sshd)
	installDynamic(t, root, keygen)
	os.MkdirAll(filepath.Join(root, "etc/ssh"), 0o755)
	os.WriteFile(filepath.Join(root, "etc/ssh/sshd_config"), []byte("Port 22\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nPidFile /run/sshd.pid\n"), 0o644)
	f, _ := os.OpenFile(filepath.Join(root, "etc/passwd"), os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("sshd:x:100:65534::/run/sshd:/bin/false\n")
	f.Close()
	os.Chmod(filepath.Join(root, "root"), 0o700)

	key := filepath.Join(t.TempDir(), "id")
	if out, err := exec.Command(keygen, "-q", "-t", "ed25519", "-N", "", "-f", key).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	pub, _ := os.ReadFile(key + ".pub")
	conf := "virtkit.mode=agent\nvirtkit.hostname=vk-ssh\nvirtkit.net=none\nvirtkit.listen=unix:///.virtkit/agent.sock\nvirtkit.ssh_key=b64:" + base64.StdEncoding.EncodeToString(pub) + "\n"
	g := agenttest.BootNS(t, root, conf)
	c := g.Dial(t)
	defer func() {
		c.Shutdown(context.Background(), true)
		g.Wait(t)
	}()
	agent := cmdtest.Binary(t, "virtkit-agent")
	proxy := agent + " connect --port 22 unix://" + filepath.Join(root, ".virtkit/agent.sock")
	var out []byte
	var err error
	for range 50 { // sshd starts after the exec server
		out, err = exec.Command(sshc, "-F", "/dev/null", "-i", key, "-o", "ProxyCommand="+proxy, "-o", "BatchMode=yes",
			"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
			"root@Guest", "echo $((6*7)); hostname").CombinedOutput()
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil || string(out) != "42\nvk-ssh\n" {
		t.Fatalf("ssh through the agent: %q %v", out, err)
	}
}

// readFrame reads one length-prefixed Ethernet frame (the switch's stream framing).
func readFrame(r io.Reader) ([]byte, error) {
	var h [4]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, err
	}
	n := int(h[0])<<24 | int(h[1])<<16 | int(h[2])<<8 | int(h[3])
	if n > 65536 {
		return nil, fmt.Errorf("frame of %d bytes", n)
	}
	b := make([]byte, n)
	_, err := io.ReadFull(r, b)
	return b, err
}

// isDHCPDiscover reports an Ethernet/IPv4/UDP frame to port 67 carrying a DHCPDISCOVER.
func isDHCPDiscover(f []byte) bool {
	if len(f) < 14+20+8+240 || f[12] != 0x08 || f[13] != 0x00 || f[14+9] != 17 {
		return false
	}
	ihl := int(f[14]&0x0f) * 4
	udp := f[14+ihl:]
	if len(udp) < 8+240 || int(udp[2])<<8|int(udp[3]) != 67 {
		return false
	}
	opts := udp[8+240:]
	for i := 0; i+1 < len(opts) && opts[i] != 255; i += 2 + int(opts[i+1]) {
		if opts[i] == 53 && i+2 < len(opts) {
			return opts[i+2] == 1
		}
	}
	return false
}

// TestInitNetworkRelay checks that init starts the network relay (the net subcommand) as a
// supervised child with the configuration from virtkit.net: it reaches the switch endpoint and
// asks for an address with DHCP, restarts when the switch goes away, and with a static address
// configures the tap itself.
func TestInitNetworkRelay(t *testing.T) {
	root := agenttest.BusyboxRoot(t)
	sw, err := net.Listen("unix", filepath.Join(root, ".virtkit/switch.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Close()
	g := agenttest.BootNS(t, root, "virtkit.mode=agent\nvirtkit.net=dhcp\nvirtkit.relay=unix:///.virtkit/switch.sock\nvirtkit.listen=unix:///.virtkit/agent.sock\n")
	accept := func() net.Conn {
		t.Helper()
		sw.(*net.UnixListener).SetDeadline(time.Now().Add(20 * time.Second))
		c, err := sw.Accept()
		if err != nil {
			t.Fatalf("the relay never connected to the switch: %v", err)
		}
		return c
	}
	c := accept()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	for {
		f, err := readFrame(c)
		if err != nil {
			t.Fatalf("no DHCPDISCOVER from the relay: %v", err)
		}
		if isDHCPDiscover(f) {
			break
		}
	}
	c.Close()
	accept().Close() // the switch went away: the relay comes back
	ag := g.Dial(t)
	ag.Shutdown(context.Background(), true)
	agenttest.PoweredOff(t, g.Wait(t))

	root = agenttest.BusyboxRoot(t)
	sw2, err := net.Listen("unix", filepath.Join(root, ".virtkit/switch.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer sw2.Close()
	sw = sw2
	g = agenttest.BootNS(t, root, "virtkit.mode=agent\nvirtkit.net=static:10.77.0.5/24,10.77.0.1\nvirtkit.dns=10.77.0.1\nvirtkit.relay=unix:///.virtkit/switch.sock\nvirtkit.listen=unix:///.virtkit/agent.sock\n")
	c = accept()
	defer c.Close()
	go io.Copy(io.Discard, c)
	ag = g.Dial(t)
	var got string
	for range 100 {
		got = sh(t, ag, "ip -4 addr show vk0; ip route")
		if strings.Contains(got, "10.77.0.5/24") && strings.Contains(got, "default via 10.77.0.1") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(got, "10.77.0.5/24") || !strings.Contains(got, "default via 10.77.0.1") {
		t.Fatalf("static address not configured:\n%s", got)
	}
	ag.Shutdown(context.Background(), true)
	agenttest.PoweredOff(t, g.Wait(t))
}
