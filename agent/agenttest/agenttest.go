// Package agenttest runs virtkit-agent for real in tests: as PID 1 of fresh namespaces over a
// busybox-static root (BootNS), or as the kernel's init in a QEMU microVM with a vhost-user vsock
// backend (BootVM), with the root folder, initramfs and console capture they need.
//
// Concurrency: helpers are called from the test goroutine; a Console may be written and read
// concurrently. Everything started is stopped in t.Cleanup.
package agenttest

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/vhostuser/vsock"
)

// Console collects what a guest writes to its console.
type Console struct{ cmdtest.Buffer }

func (c *Console) WaitFor(t testing.TB, s string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(c.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("console never showed %q; console:\n%s", s, c.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BusyboxRoot builds a root filesystem folder: Debian's busybox-static with its applets, a
// passwd/group, and the agent at /sbin/virtkit-agent.
func BusyboxRoot(t testing.TB) string {
	t.Helper()
	cmdtest.RequireRoot(t)
	bb := cmdtest.Tool(t, "busybox")
	agent := cmdtest.Binary(t, "virtkit-agent")
	root := filepath.Join(t.TempDir(), "root")
	for _, d := range []string{"bin", "sbin", "etc/virtkit", "proc", "sys", "dev", "run", "tmp", "root", ".virtkit", "usr/bin"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	CopyFile(t, bb, filepath.Join(root, "bin/busybox"))
	CopyFile(t, agent, filepath.Join(root, "sbin/virtkit-agent"))
	out, err := exec.Command(bb, "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		p := filepath.Join(root, "bin", applet)
		if _, err := os.Lstat(p); err == nil {
			continue
		}
		if err := os.Symlink("busybox", p); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(root, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc/group"), []byte("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"), 0o644)
	return root
}

// CopyFile copies a file, making the copy executable.
func CopyFile(t testing.TB, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// Guest is virtkit-agent running as PID 1 of its own namespaces.
type Guest struct {
	Cmd  *exec.Cmd // the init process, as seen from the host
	Con  *Console  // what init writes to its console
	Root string    // the root folder
	done chan struct{}
	err  error
}

// BootNS starts /sbin/virtkit-agent with no arguments as PID 1 of new pid, mount, uts, ipc and
// net namespaces chrooted into root, configured only by root/etc/virtkit/agent.conf.
func BootNS(t testing.TB, root, conf string) *Guest {
	t.Helper()
	if err := os.WriteFile(filepath.Join(root, "etc/virtkit/agent.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	g := &Guest{Con: &Console{}, done: make(chan struct{}), Root: root}
	cmd := exec.Command("/sbin/virtkit-agent")
	cmd.Env = []string{"HOME=/", "TERM=linux"} // what the kernel gives init: no PATH
	cmd.Stdout, cmd.Stderr = g.Con, g.Con
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:   syscall.CLONE_NEWPID | syscall.CLONE_NEWUTS | syscall.CLONE_NEWNET | syscall.CLONE_NEWIPC,
		Unshareflags: syscall.CLONE_NEWNS, // Go makes / rprivate first: nothing leaks to the host
		Chroot:       root,
		Pdeathsig:    syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start init: %v", err)
	}
	g.Cmd = cmd
	go func() {
		g.err = cmd.Wait()
		close(g.done)
	}()
	t.Cleanup(func() {
		select {
		case <-g.done:
		default:
			cmd.Process.Kill()
			<-g.done
		}
		if t.Failed() || testing.Verbose() {
			t.Logf("guest console:\n%s", g.Con.String())
		}
	})
	return g
}

// Wait waits for init to end and returns how.
func (g *Guest) Wait(t testing.TB) *os.ProcessState {
	t.Helper()
	select {
	case <-g.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("init did not end; console:\n%s", g.Con.String())
	}
	return g.Cmd.ProcessState
}

// PoweredOff checks the kernel ended the namespace the way reboot(POWER_OFF) from its init does.
func PoweredOff(t testing.TB, st *os.ProcessState) {
	t.Helper()
	ws := st.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGINT {
		t.Fatalf("init ended with %v, want the pid namespace's power-off (killed by SIGINT)", st)
	}
}

func (g *Guest) Dial(t testing.TB) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := client.WaitReady(ctx, "unix://"+filepath.Join(g.Root, ".virtkit/agent.sock"))
	if err != nil {
		t.Fatalf("agent never answered: %v; console:\n%s", err, g.Con.String())
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Initramfs packs root into a newc initramfs.
func Initramfs(t testing.TB, root, out string) {
	t.Helper()
	var b bytes.Buffer
	ino := 1
	hdr := func(name string, mode uint32, size int) {
		fmt.Fprintf(&b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X", ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name)+1, 0)
		ino++
		b.WriteString(name)
		b.WriteByte(0)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
	}
	pad := func() {
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
	}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		name, _ := filepath.Rel(root, p)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		perm := uint32(fi.Mode().Perm())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			hdr(name, 0o120000|0o777, len(target))
			b.WriteString(target)
		case fi.IsDir():
			hdr(name, 0o040000|perm, 0)
		default:
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			hdr(name, 0o100000|perm, len(data))
			b.Write(data)
		}
		pad()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	hdr("TRAILER!!!", 0, 0)
	if err := os.WriteFile(out, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// HostKHz is the host CPU clock in kHz, for the guest kernel's tsc_early_khz under TCG.
func HostKHz() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			f, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return int(f * 1000)
		}
	}
	return 0
}

// VM is a QEMU microVM.
type VM struct {
	Con   *Console // the serial console
	UDS   string   // the hybrid vsock socket: hvsock://UDS:PORT
	done  chan error
	state *os.ProcessState
}

// URL is the agent's exec endpoint from the host.
func (v *VM) URL() string { return "hvsock://" + v.UDS + ":1024" }

// BootVM starts a QEMU microVM (TCG here) with a vhost-user vsock backend. extra are more QEMU
// arguments (disks, an initrd).
func BootVM(t testing.TB, ctx context.Context, cmdline string, extra ...string) *VM {
	t.Helper()
	kernel := cmdtest.Kernel(t)
	qemu := cmdtest.Tool(t, "qemu-system-x86_64")
	dir := t.TempDir()
	v := &VM{Con: &Console{}, done: make(chan error, 1), UDS: filepath.Join(dir, "v.sock")}
	be, err := vsock.Serve(ctx, vsock.Config{Socket: filepath.Join(dir, "vhost.sock"), UDS: v.UDS, CID: 3, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })
	cmdline = "console=ttyS0 reboot=t panic=-1 pci=off quiet " + cmdline
	if khz := HostKHz(); khz > 0 {
		cmdline += " tsc_early_khz=" + strconv.Itoa(khz)
	}
	args := []string{"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-accel", "tcg",
		"-smp", "1", "-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
		"-M", "microvm,memory-backend=mem,rtc=on", "-global", "virtio-mmio.force-legacy=false",
		"-kernel", kernel, "-append", cmdline, "-serial", "stdio",
		"-chardev", "socket,id=vsock,path=" + filepath.Join(dir, "vhost.sock"), "-device", "vhost-user-vsock-device,chardev=vsock"}
	q := exec.Command(qemu, append(args, extra...)...)
	q.Stdout, q.Stderr = v.Con, v.Con
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { v.done <- q.Wait() }()
	t.Cleanup(func() {
		q.Process.Kill()
		if v.state == nil {
			<-v.done
		}
		if t.Failed() || testing.Verbose() {
			t.Logf("VM console:\n%s", v.Con.String())
		}
	})
	return v
}

// Wait waits for QEMU to exit by itself (the Guest powered off).
func (v *VM) Wait(t testing.TB) {
	t.Helper()
	select {
	case err := <-v.done:
		v.state = &os.ProcessState{}
		if err != nil {
			t.Fatalf("QEMU: %v", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("the VM did not power off")
	}
}
