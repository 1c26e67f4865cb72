package initproc_test

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
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/vhostuser/vsock"
)

// writeCpio packs root into a newc initramfs.
func writeCpio(t *testing.T, root, out string) {
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

func hostKHz() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			f, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return int(f * 1000)
		}
	}
	return 0
}

type vm struct {
	con   *console
	done  chan error
	uds   string
	state *os.ProcessState
}

// bootVM starts a QEMU microVM (TCG here) with a vhost-user vsock backend. extra are more QEMU
// arguments (disks, an initrd).
func bootVM(t *testing.T, ctx context.Context, cmdline string, extra ...string) *vm {
	t.Helper()
	kernel := cmdtest.Kernel(t)
	qemu := cmdtest.Tool(t, "qemu-system-x86_64")
	dir := t.TempDir()
	v := &vm{con: &console{}, done: make(chan error, 1), uds: filepath.Join(dir, "v.sock")}
	be, err := vsock.Serve(ctx, vsock.Config{Socket: filepath.Join(dir, "vhost.sock"), UDS: v.uds, CID: 3, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })
	cmdline = "console=ttyS0 reboot=t panic=-1 pci=off quiet " + cmdline
	if khz := hostKHz(); khz > 0 {
		cmdline += " tsc_early_khz=" + strconv.Itoa(khz)
	}
	args := []string{"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-accel", "tcg",
		"-smp", "1", "-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
		"-M", "microvm,memory-backend=mem,rtc=on", "-global", "virtio-mmio.force-legacy=false",
		"-kernel", kernel, "-append", cmdline, "-serial", "stdio",
		"-chardev", "socket,id=vsock,path=" + filepath.Join(dir, "vhost.sock"), "-device", "vhost-user-vsock-device,chardev=vsock"}
	q := exec.Command(qemu, append(args, extra...)...)
	q.Stdout, q.Stderr = v.con, v.con
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
			t.Logf("VM console:\n%s", v.con.String())
		}
	})
	return v
}

// wait waits for QEMU to exit by itself (the guest powered off).
func (v *vm) wait(t *testing.T) {
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

// TestVM boots the agent as the kernel's init (from an initramfs) in a real QEMU microVM with a
// vhost-user vsock backend, drives it over hybrid vsock from the host, and shuts it down.
func TestVM(t *testing.T) {
	cmdtest.Heavy(t)
	root := busyboxRoot(t)
	initrd := filepath.Join(t.TempDir(), "initrd.cpio")
	writeCpio(t, root, initrd)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// A virtio-fs share (QEMU's own virtiofsd serves it), mounted by init from virtkit.fs.
	virtiofsd := cmdtest.Tool(t, "virtiofsd")
	shared := t.TempDir()
	os.WriteFile(filepath.Join(shared, "hello.txt"), []byte("from the host\n"), 0o644)
	fsSock := filepath.Join(t.TempDir(), "fs.sock")
	fsd := exec.Command(virtiofsd, "--socket-path="+fsSock, "-o", "source="+shared, "-o", "cache=none")
	var fsLog bytes.Buffer
	fsd.Stderr = &fsLog
	if err := fsd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fsd.Process.Kill(); fsd.Wait() })
	for range 100 {
		if _, err := os.Stat(fsSock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	v := bootVM(t, ctx, "rdinit=/sbin/virtkit-agent virtkit.mode=agent virtkit.net=none virtkit.hostname=vmtest virtkit.fs=share:/mnt/share",
		"-initrd", initrd, "-chardev", "socket,id=fs0,path="+fsSock, "-device", "vhost-user-fs-device,chardev=fs0,tag=share")

	c, err := client.WaitReady(ctx, "hvsock://"+v.uds+":1024")
	if err != nil {
		t.Fatalf("agent in the VM never answered: %v", err)
	}
	defer c.Close()
	in, err := c.Info(ctx)
	if err != nil || !in.PID1 || in.Hostname != "vmtest" || in.Mode != "agent" || len(in.Boot) == 0 {
		t.Fatalf("info: %+v %v", in, err)
	}
	t.Logf("guest %s, kernel %s, boot marks %v", in.Hostname, in.Kernel, in.Boot)
	var out bytes.Buffer
	st, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"sh", "-c", "cat /proc/1/cmdline; echo; cat /proc/mounts | wc -l; exit 3"}}, nil, &out, nil)
	if err != nil || st.Code != 3 || !strings.HasPrefix(out.String(), "/sbin/virtkit-agent") {
		t.Fatalf("exec in the VM: %q %+v %v", out.String(), st, err)
	}
	out.Reset()
	st, err = c.Exec(ctx, client.ExecRequest{Argv: []string{"sh", "-c", "cat /mnt/share/hello.txt && echo from the guest > /mnt/share/back.txt && grep ' /mnt/share virtiofs ' /proc/mounts"}}, nil, &out, nil)
	if err != nil || st.Code != 0 || !strings.HasPrefix(out.String(), "from the host\nshare /mnt/share virtiofs rw") {
		t.Fatalf("virtio-fs share: %q %+v %v; virtiofsd: %s", out.String(), st, err, fsLog.String())
	}
	if b, err := os.ReadFile(filepath.Join(shared, "back.txt")); err != nil || string(b) != "from the guest\n" {
		t.Fatalf("guest write through virtio-fs: %q %v", b, err)
	}
	var n countBytes
	st, err = c.Exec(ctx, client.ExecRequest{Argv: []string{"head", "-c", "16777216", "/dev/zero"}}, nil, &n, nil)
	if err != nil || st.Code != 0 || n != 16<<20 {
		t.Fatalf("16 MiB over vsock: %d bytes, %+v %v", n, st, err)
	}
	out.Reset()
	st, err = c.Exec(ctx, client.ExecRequest{Argv: []string{"stty", "size"}, TTY: true, Rows: 50, Cols: 120}, strings.NewReader(""), &out, nil)
	if err != nil || !strings.Contains(out.String(), "50 120") {
		t.Fatalf("tty in the VM: %q %+v %v", out.String(), st, err)
	}
	if err := c.Shutdown(ctx, true); err != nil {
		t.Fatal(err)
	}
	v.wait(t)
	if !strings.Contains(v.con.String(), "virtkit: power off") {
		t.Fatalf("console:\n%s", v.con.String())
	}
}

// TestVMDiskRoot boots the way virtkit runs images: a read-only ext4 base as /dev/vda (the kernel
// mounts it, init=/sbin/virtkit-agent), a per-VM writable ext4 disk as /dev/vdb stacked with
// overlayfs, and entrypoint mode. The exit code reaches the console, the VM powers off, and the
// writable disk is clean and holds the guest's writes while the base is untouched.
func TestVMDiskRoot(t *testing.T) {
	cmdtest.Heavy(t)
	mkfs := cmdtest.Tool(t, "mkfs.ext4")
	e2fsck := cmdtest.Tool(t, "e2fsck")
	debugfs := cmdtest.Tool(t, "debugfs")
	root := busyboxRoot(t)
	writeImage(t, root, `{"entrypoint":["/bin/sh","-c"],"cmd":["echo from-the-vm > /root/note; grep -E ' / |/run/virtkit' /proc/mounts; exit 5"],"env":["PATH=/bin:/sbin"]}`)
	dir := t.TempDir()
	base, rw := filepath.Join(dir, "base.ext4"), filepath.Join(dir, "rw.ext4")
	for _, c := range [][]string{{mkfs, "-q", "-F", "-d", root, base, "64M"}, {mkfs, "-q", "-F", rw, "32M"}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", c, err, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	v := bootVM(t, ctx, "root=/dev/vda ro rootfstype=ext4 init=/sbin/virtkit-agent virtkit.overlay=/dev/vdb virtkit.net=none",
		"-drive", "id=base,file="+base+",format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=base",
		"-drive", "id=rw,file="+rw+",format=raw,if=none", "-device", "virtio-blk-device,drive=rw")
	v.wait(t)
	con := v.con.String()
	for _, want := range []string{"overlay / overlay", "/dev/vdb /run/virtkit/rw ext4", "virtkit: exit-code 5\r\n", "virtkit: power off"} {
		if !strings.Contains(con, want) {
			t.Errorf("console lacks %q", want)
		}
	}
	for _, img := range []string{base, rw} {
		if out, err := exec.Command(e2fsck, "-fn", img).CombinedOutput(); err != nil {
			t.Errorf("e2fsck %s after poweroff: %v\n%s", filepath.Base(img), err, out)
		}
	}
	if out, err := exec.Command(debugfs, "-R", "cat /upper/root/note", rw).Output(); err != nil || string(out) != "from-the-vm\n" {
		t.Errorf("writable disk: %q %v", out, err)
	}
	if out, _ := exec.Command(debugfs, "-R", "stat /root/note", base).CombinedOutput(); !strings.Contains(string(out), "not found") {
		t.Errorf("the base image was written:\n%s", out)
	}
}

type countBytes int

func (c *countBytes) Write(p []byte) (int, error) { *c += countBytes(len(p)); return len(p), nil }
