package vmm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// busyboxInitramfs makes a gzip'd newc initramfs whose /init is the given shell script.
func busyboxInitramfs(t *testing.T, script string) string {
	t.Helper()
	bb := cmdtest.Tool(t, "busybox")
	cmdtest.Tool(t, "cpio")
	root := filepath.Join(t.TempDir(), "root")
	for _, d := range []string{"bin", "proc", "sys", "dev"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "bin", "busybox"), b, 0o755)
	for _, c := range []string{"sh", "mount", "echo", "poweroff", "sleep", "cat"} {
		os.Symlink("busybox", filepath.Join(root, "bin", c))
	}
	os.WriteFile(filepath.Join(root, "init"), []byte("#!/bin/sh\n"+script), 0o755)
	out := filepath.Join(t.TempDir(), "initramfs.cpio")
	cmd := exec.Command("sh", "-c", "find . | cpio -o -H newc > "+out)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v: %s", err, b)
	}
	return out
}

func qemuSpec(t *testing.T, initramfs string) Spec {
	return Spec{
		Name: "vmmtest", Dir: filepath.Join(t.TempDir(), "vm"), Kernel: cmdtest.Kernel(t), Initramfs: initramfs,
		Cmdline: "rdinit=/init quiet", CPUs: 1, MemoryMiB: 256,
	}
}

func newQEMU(t *testing.T) *QEMU {
	cmdtest.Heavy(t)
	cmdtest.Tool(t, "qemu-system-x86_64")
	q, err := NewQEMU("")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("accel %s: %s", q.Accel.Name, q.Accel.Reason)
	return q
}

func TestQEMUBootsAndPowersOff(t *testing.T) {
	for _, machine := range []string{"microvm", "q35"} {
		t.Run(machine, func(t *testing.T) {
			q := newQEMU(t)
			q.Machine = machine
			spec := qemuSpec(t, busyboxInitramfs(t, "mount -t proc proc /proc\necho VK-MARKER $(cat /proc/cmdline)\npoweroff -f\n"))
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			m, err := q.Start(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { m.Kill() })
			select {
			case <-m.Done():
			case <-ctx.Done():
				t.Fatalf("guest did not power off; console:\n%s", ConsoleTail(spec, 20))
			}
			if err := m.Wait(); err != nil {
				t.Fatalf("qemu: %v", err)
			}
			con := ConsoleTail(spec, 50)
			if !strings.Contains(con, "VK-MARKER") || !strings.Contains(con, "rdinit=/init") {
				t.Fatalf("console lacks the guest's output:\n%s", con)
			}
			if _, err := os.Stat(spec.PIDFile()); !os.IsNotExist(err) {
				t.Errorf("pid file left behind: %v", err)
			}
		})
	}
}

func TestQEMUShutdownOfUnresponsiveGuest(t *testing.T) {
	q := newQEMU(t)
	spec := qemuSpec(t, busyboxInitramfs(t, "echo VK-UP\nwhile :; do sleep 1; done\n"))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	m, err := q.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	for !strings.Contains(ConsoleTail(spec, 5), "VK-UP") {
		select {
		case <-ctx.Done():
			t.Fatalf("guest never came up:\n%s", ConsoleTail(spec, 20))
		case <-time.After(50 * time.Millisecond):
		}
	}
	pid := m.PID()
	sctx, scancel := context.WithTimeout(ctx, time.Second)
	defer scancel()
	if err := m.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Fatalf("qemu pid %d still alive after Shutdown", pid)
	}
}

func TestQEMUArgs(t *testing.T) {
	q := &QEMU{Binary: "qemu-system-x86_64", Machine: "microvm", Accel: Accel{Name: "tcg"}}
	s := Spec{Name: "a", Dir: "/run/vk/a", Kernel: "/k", Cmdline: "root=/dev/vda", CPUs: 2, MemoryMiB: 512,
		Disks:        []Disk{{Path: "/img,with,commas", ReadOnly: true}},
		Shares:       []Share{{Tag: "s", Socket: "/fs.sock"}},
		VsockCID:     3,
		VsockBackend: "/vsock.vhost",
		NICs:         []NIC{{Tap: "vkpool0", MAC: "52:54:00:12:34:56"}}}
	args := strings.Join(q.Args(s), " ")
	for _, want := range []string{
		"-M microvm,memory-backend=mem",
		"memory-backend-memfd,id=mem,size=512M,share=on",
		"-global virtio-mmio.force-legacy=false",
		"file=/img,,with,,commas,format=raw,if=none,cache=unsafe,discard=unmap,readonly=on",
		"vhost-user-fs-device,chardev=fs0,tag=s",
		"vhost-user-vsock-device,chardev=vsock",
		"tsc_early_khz=",
		"-accel tcg",
		"-netdev tap,id=n0,ifname=vkpool0,script=no,downscript=no -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("qemu args lack %q:\n%s", want, args)
		}
	}
	q.Machine = "q35"
	if args := strings.Join(q.Args(s), " "); !strings.Contains(args, "vhost-user-vsock-pci") || strings.Contains(args, "tsc_early_khz") {
		t.Errorf("q35 args wrong:\n%s", args)
	}
}
