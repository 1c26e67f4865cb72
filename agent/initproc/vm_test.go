package initproc_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/virtkit/virtkit/agent/agenttest"
	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// TestVM boots the agent as the kernel's init (from an initramfs) in a real QEMU microVM with a
// vhost-user vsock backend, drives it over hybrid vsock from the host, and shuts it down.
func TestVM(t *testing.T) {
	cmdtest.Heavy(t)
	root := agenttest.BusyboxRoot(t)
	initrd := filepath.Join(t.TempDir(), "initrd.cpio")
	agenttest.Initramfs(t, root, initrd)
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
	v := agenttest.BootVM(t, ctx, "rdinit=/sbin/virtkit-agent virtkit.mode=agent virtkit.net=none virtkit.hostname=vmtest virtkit.fs=share:/mnt/share",
		"-initrd", initrd, "-chardev", "socket,id=fs0,path="+fsSock, "-device", "vhost-user-fs-device,chardev=fs0,tag=share")

	c, err := client.WaitReady(ctx, "hvsock://"+v.UDS+":1024")
	if err != nil {
		t.Fatalf("agent in the VM never answered: %v", err)
	}
	defer c.Close()
	in, err := c.Info(ctx)
	if err != nil || !in.PID1 || in.Hostname != "vmtest" || in.Mode != "agent" || len(in.Boot) == 0 {
		t.Fatalf("info: %+v %v", in, err)
	}
	t.Logf("Guest %s, kernel %s, boot marks %v", in.Hostname, in.Kernel, in.Boot)
	var out bytes.Buffer
	st, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"sh", "-c", "cat /proc/1/cmdline; echo; cat /proc/mounts | wc -l; exit 3"}}, nil, &out, nil)
	if err != nil || st.Code != 3 || !strings.HasPrefix(out.String(), "/sbin/virtkit-agent") {
		t.Fatalf("exec in the VM: %q %+v %v", out.String(), st, err)
	}
	out.Reset()
	st, err = c.Exec(ctx, client.ExecRequest{Argv: []string{"sh", "-c", "cat /mnt/share/hello.txt && echo from the Guest > /mnt/share/back.txt && grep ' /mnt/share virtiofs ' /proc/mounts"}}, nil, &out, nil)
	if err != nil || st.Code != 0 || !strings.HasPrefix(out.String(), "from the host\nshare /mnt/share virtiofs rw") {
		t.Fatalf("virtio-fs share: %q %+v %v; virtiofsd: %s", out.String(), st, err, fsLog.String())
	}
	if b, err := os.ReadFile(filepath.Join(shared, "back.txt")); err != nil || string(b) != "from the Guest\n" {
		t.Fatalf("Guest write through virtio-fs: %q %v", b, err)
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
	v.Wait(t)
	if !strings.Contains(v.Con.String(), "virtkit: power off") {
		t.Fatalf("console:\n%s", v.Con.String())
	}
}

// TestVMDiskRoot boots the way virtkit runs images: a read-only ext4 base as /dev/vda (the kernel
// mounts it, init=/sbin/virtkit-agent), a per-VM writable ext4 disk as /dev/vdb stacked with
// overlayfs, and entrypoint mode. The exit code reaches the console, the VM powers off, and the
// writable disk is clean and holds the Guest's writes while the base is untouched.
func TestVMDiskRoot(t *testing.T) {
	cmdtest.Heavy(t)
	mkfs := cmdtest.Tool(t, "mkfs.ext4")
	e2fsck := cmdtest.Tool(t, "e2fsck")
	debugfs := cmdtest.Tool(t, "debugfs")
	root := agenttest.BusyboxRoot(t)
	writeImage(t, root, `{"entrypoint":["/bin/sh","-c"],"cmd":["echo from-the-VM > /root/note; grep -E ' / |/run/virtkit' /proc/mounts; exit 5"],"env":["PATH=/bin:/sbin"]}`)
	dir := t.TempDir()
	base, rw := filepath.Join(dir, "base.ext4"), filepath.Join(dir, "rw.ext4")
	for _, c := range [][]string{{mkfs, "-q", "-F", "-d", root, base, "64M"}, {mkfs, "-q", "-F", rw, "32M"}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", c, err, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	v := agenttest.BootVM(t, ctx, "root=/dev/vda ro rootfstype=ext4 init=/sbin/virtkit-agent virtkit.overlay=/dev/vdb virtkit.net=none",
		"-drive", "id=base,file="+base+",format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=base",
		"-drive", "id=rw,file="+rw+",format=raw,if=none", "-device", "virtio-blk-device,drive=rw")
	v.Wait(t)
	con := v.Con.String()
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
	if out, err := exec.Command(debugfs, "-R", "cat /upper/root/note", rw).Output(); err != nil || string(out) != "from-the-VM\n" {
		t.Errorf("writable disk: %q %v", out, err)
	}
	if out, _ := exec.Command(debugfs, "-R", "stat /root/note", base).CombinedOutput(); !strings.Contains(string(out), "not found") {
		t.Errorf("the base image was written:\n%s", out)
	}
}

type countBytes int

func (c *countBytes) Write(p []byte) (int, error) { *c += countBytes(len(p)); return len(p), nil }
