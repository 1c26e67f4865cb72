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

// TestVM boots the agent as the kernel's init in a real QEMU microVM (TCG here) with a
// vhost-user vsock backend, drives it over hybrid vsock from the host, and shuts it down.
func TestVM(t *testing.T) {
	cmdtest.Heavy(t)
	kernel := cmdtest.Kernel(t)
	qemu := cmdtest.Tool(t, "qemu-system-x86_64")
	root := busyboxRoot(t)
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.cpio")
	writeCpio(t, root, initrd)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	uds := filepath.Join(dir, "v.sock")
	be, err := vsock.Serve(ctx, vsock.Config{Socket: filepath.Join(dir, "vhost.sock"), UDS: uds, CID: 3, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })

	cmdline := "console=ttyS0 reboot=t panic=-1 pci=off quiet rdinit=/sbin/virtkit-agent virtkit.mode=agent virtkit.net=none virtkit.hostname=vmtest"
	if khz := hostKHz(); khz > 0 {
		cmdline += " tsc_early_khz=" + strconv.Itoa(khz)
	}
	con := &console{}
	q := exec.Command(qemu, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-accel", "tcg",
		"-smp", "1", "-m", "512M", "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
		"-M", "microvm,memory-backend=mem,rtc=on", "-global", "virtio-mmio.force-legacy=false",
		"-kernel", kernel, "-initrd", initrd, "-append", cmdline, "-serial", "stdio",
		"-chardev", "socket,id=vsock,path="+filepath.Join(dir, "vhost.sock"), "-device", "vhost-user-vsock-device,chardev=vsock")
	q.Stdout, q.Stderr = con, con
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	qdone := make(chan error, 1)
	go func() { qdone <- q.Wait() }()
	t.Cleanup(func() {
		q.Process.Kill()
		<-qdone
		if t.Failed() || testing.Verbose() {
			t.Logf("VM console:\n%s", con.String())
		}
	})

	c, err := client.WaitReady(ctx, "hvsock://"+uds+":1024")
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
	select {
	case err := <-qdone:
		qdone <- err
		if err != nil {
			t.Fatalf("QEMU: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the VM did not power off")
	}
	if !strings.Contains(con.String(), "virtkit: power off") {
		t.Fatalf("console:\n%s", con.String())
	}
}

type countBytes int

func (c *countBytes) Write(p []byte) (int, error) { *c += countBytes(len(p)); return len(p), nil }
