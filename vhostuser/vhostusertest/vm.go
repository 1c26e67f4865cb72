package vhostusertest

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/workers/launcher/vmm"
)

// GuestProg builds the test guest's init (vhostuser/internal/guestprog) as a static binary.
func GuestProg(t testing.TB) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "guestprog")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./vhostuser/internal/guestprog")
	cmd.Dir = cmdtest.Root(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOAMD64=v1")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build guestprog: %v\n%s", err, b)
	}
	return out
}

// Initramfs writes a newc archive holding /init (the given binary), the folders init mounts
// onto, and /dev/console.
func Initramfs(t testing.TB, init string) string {
	t.Helper()
	b, err := os.ReadFile(init)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "initramfs.cpio")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriter(f)
	ino := uint32(1)
	entry := func(name string, mode uint32, rdev [2]uint32, data []byte) {
		hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name)+1, 0)
		ino++
		w.WriteString(hdr)
		w.WriteString(name)
		w.WriteByte(0)
		pad(w, 110+len(name)+1)
		w.Write(data)
		pad(w, len(data))
	}
	for _, d := range []string{"dev", "proc", "sys", "mnt", "tmp"} {
		entry(d, syscall.S_IFDIR|0o755, [2]uint32{}, nil)
	}
	entry("dev/console", syscall.S_IFCHR|0o600, [2]uint32{5, 1}, nil)
	entry("init", syscall.S_IFREG|0o755, [2]uint32{}, b)
	entry("TRAILER!!!", 0, [2]uint32{}, nil)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

func pad(w *bufio.Writer, n int) {
	for n%4 != 0 {
		w.WriteByte(0)
		n++
	}
}

// VM is a QEMU guest started by Boot.
type VM struct {
	Console string // console log path
	cmd     *exec.Cmd
	done    chan error
}

// VMConfig describes a test guest.
type VMConfig struct {
	Initramfs string
	InitArgs  []string // after "--" on the kernel command line
	MemoryMiB int      // default 256
	Devices   []string // extra QEMU arguments (vhost-user chardevs and devices)
	// Machine is "microvm" (default, virtio-mmio: use vhost-user-*-device) or "q35" (PCI: use
	// vhost-user-*-pci).
	Machine string
}

// Boot starts QEMU (microvm, TCG unless KVM works, shared memfd memory as vhost-user needs) and
// kills it at cleanup.
func Boot(t testing.TB, c VMConfig) *VM {
	t.Helper()
	cmdtest.Heavy(t)
	qemu := cmdtest.Tool(t, "qemu-system-x86_64")
	kernel := cmdtest.Kernel(t)
	if c.MemoryMiB == 0 {
		c.MemoryMiB = 256
	}
	dir := t.TempDir()
	mem := strconv.Itoa(c.MemoryMiB) + "M"
	vm := &VM{Console: filepath.Join(dir, "console.log"), done: make(chan error, 1)}
	q35 := c.Machine == "q35"
	cmdline := "console=ttyS0 reboot=t panic=-1 quiet rdinit=/init"
	machine := []string{"-M", "microvm,memory-backend=mem,rtc=on", "-global", "virtio-mmio.force-legacy=false"}
	if q35 {
		machine = []string{"-M", "q35,memory-backend=mem"}
	} else {
		cmdline += " pci=off"
		if khz := vmm.HostKHz(); khz > 0 {
			cmdline += " tsc_early_khz=" + strconv.Itoa(khz)
		}
	}
	if len(c.InitArgs) > 0 {
		cmdline += " -- " + strings.Join(c.InitArgs, " ")
	}
	args := append([]string{
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-accel", "tcg", "-smp", "1", "-m", mem,
		"-object", "memory-backend-memfd,id=mem,size=" + mem + ",share=on",
	}, machine...)
	args = append(append(args,
		"-kernel", kernel, "-append", cmdline, "-initrd", c.Initramfs,
		"-chardev", "file,id=con,path="+vm.Console, "-serial", "chardev:con",
	), c.Devices...)
	vm.cmd = exec.Command(qemu, args...)
	var stderr strings.Builder
	vm.cmd.Stdout, vm.cmd.Stderr = &stderr, &stderr
	if err := vm.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() {
		err := vm.cmd.Wait()
		if err != nil {
			err = fmt.Errorf("qemu: %w: %s", err, stderr.String())
		}
		vm.done <- err
	}()
	t.Cleanup(func() {
		vm.cmd.Process.Kill()
		select {
		case <-vm.done:
		case <-time.After(10 * time.Second):
		}
	})
	return vm
}

// Wait waits for QEMU to exit (the guest powered off).
func (vm *VM) Wait(timeout time.Duration) error {
	select {
	case err := <-vm.done:
		vm.done <- err
		return err
	case <-time.After(timeout):
		return fmt.Errorf("qemu still running after %v; console:\n%s", timeout, vm.Output())
	}
}

// WaitConsole waits until the console log contains s.
func (vm *VM) WaitConsole(s string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(vm.Output(), s) {
			return nil
		}
		select {
		case err := <-vm.done:
			vm.done <- err
			if strings.Contains(vm.Output(), s) {
				return nil
			}
			return fmt.Errorf("qemu exited (%v) before %q; console:\n%s", err, s, vm.Output())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("no %q on the console within %v; console:\n%s", s, timeout, vm.Output())
}

// Output returns the console log so far.
func (vm *VM) Output() string {
	b, _ := os.ReadFile(vm.Console)
	return string(b)
}
