// Package vmm drives virtual machine monitors: QEMU (microvm or q35, KVM when usable, else TCG) and
// Cloud Hypervisor (REST API over its unix socket). Everything above a Driver is identical for both:
// disks are raw ext4 files, shares are vhost-user-fs sockets served by `virtkit virtiofsd`, and the
// host reaches the guest through a hybrid-vsock unix socket (native in Cloud Hypervisor; for QEMU
// the caller runs virtkit's vhost-user-vsock backend, which speaks the same interface).
//
// A Machine is owned by the goroutine that started it: Wait may be called from any goroutine once;
// Shutdown and Kill are safe to call concurrently and more than once. VMM processes are started with
// a parent-death signal from a dedicated OS thread, so they never outlive the process that made them.
package vmm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Disk is a raw disk image attached as virtio-blk, in order (/dev/vda, /dev/vdb, …).
type Disk struct {
	Path     string
	ReadOnly bool
}

// Share is a virtio-fs device whose vhost-user backend already listens on Socket.
type Share struct {
	Tag    string
	Socket string
}

// NIC is a virtio-net device backed by a tap device that already exists (an operator's pool tap):
// the VMM opens it by name and neither creates nor configures it (QEMU script=no).
type NIC struct {
	Tap string
	// MAC is the guest's address (aa:bb:cc:dd:ee:ff); it must be unique on the tap's network.
	MAC string
}

// Spec describes one VM.
type Spec struct {
	Name      string
	Dir       string // state folder: sockets, logs, pid files live here
	Kernel    string // PVH vmlinux (or bzImage)
	Initramfs string
	Cmdline   string // appended to the driver's own console/boot arguments
	CPUs      int
	MemoryMiB int
	Disks     []Disk
	Shares    []Share
	// VsockCID is the guest CID (>= 3). The hybrid-vsock socket is always <Dir>/vsock.sock.
	VsockCID uint32
	// VsockBackend is, for QEMU, the vhost-user socket of the hybrid-vsock backend the caller runs.
	VsockBackend string
	// NICs are the guest's kernel network interfaces (eth0, eth1, … in order).
	NICs []NIC
}

// VsockSocket is the hybrid-vsock unix socket of a VM: host→guest "CONNECT <port>", and guest→host
// connections arrive at VsockSocket()+"_<port>".
func (s Spec) VsockSocket() string { return filepath.Join(s.Dir, "vsock.sock") }

// ConsoleLog is where the guest's serial console goes.
func (s Spec) ConsoleLog() string { return filepath.Join(s.Dir, "console.log") }

// VMMLog is the VMM's own stdout/stderr.
func (s Spec) VMMLog() string { return filepath.Join(s.Dir, "vmm.log") }

// PIDFile holds the VMM's pid, for reconciliation after a crash of virtkit.
func (s Spec) PIDFile() string { return filepath.Join(s.Dir, "vmm.pid") }

func (s Spec) validate() error {
	if s.Name == "" || s.Dir == "" {
		return errors.New("vmm: spec needs Name and Dir")
	}
	if _, err := os.Stat(s.Kernel); err != nil {
		return fmt.Errorf("vmm: kernel: %w", err)
	}
	if s.CPUs < 1 || s.MemoryMiB < 64 {
		return fmt.Errorf("vmm: %d cpus, %d MiB: need >= 1 cpu and >= 64 MiB", s.CPUs, s.MemoryMiB)
	}
	if s.VsockCID != 0 && s.VsockCID < 3 {
		return fmt.Errorf("vmm: vsock CID %d is reserved (want >= 3)", s.VsockCID)
	}
	for _, d := range s.Disks {
		if _, err := os.Stat(d.Path); err != nil {
			return fmt.Errorf("vmm: disk: %w", err)
		}
	}
	for _, sh := range s.Shares {
		if sh.Tag == "" || strings.ContainsAny(sh.Tag, ", ") {
			return fmt.Errorf("vmm: share tag %q: must be non-empty without commas or spaces", sh.Tag)
		}
	}
	for _, n := range s.NICs {
		if n.Tap == "" || len(n.Tap) > 15 || strings.ContainsAny(n.Tap, ",=/ \t\n") {
			return fmt.Errorf("vmm: tap %q: not an interface name", n.Tap)
		}
		if hw, err := net.ParseMAC(n.MAC); err != nil || len(hw) != 6 || hw[0]&1 != 0 {
			return fmt.Errorf("vmm: tap %s: MAC %q: want a unicast Ethernet address", n.Tap, n.MAC)
		}
	}
	return nil
}

// Machine is a running VM.
type Machine interface {
	// PID of the VMM process.
	PID() int
	// Wait blocks until the VMM exits and reports why (nil after a guest power-off).
	Wait() error
	// Done is closed when the VMM has exited.
	Done() <-chan struct{}
	// Shutdown asks the VMM to stop the guest (ACPI power-off / vm.shutdown) and waits for it, up to
	// ctx; then it kills the VMM.
	Shutdown(ctx context.Context) error
	// Kill stops the VMM at once.
	Kill() error
}

// Driver starts machines.
type Driver interface {
	Name() string
	Start(ctx context.Context, spec Spec) (Machine, error)
}

// Select returns the driver for name: "qemu", "cloud-hypervisor" or "auto" (Cloud Hypervisor when
// installed, else QEMU).
func Select(name string) (Driver, error) {
	switch name {
	case "qemu":
		return NewQEMU("")
	case "cloud-hypervisor", "ch":
		return NewCloudHypervisor("")
	case "", "auto":
		if d, err := NewCloudHypervisor(""); err == nil {
			return d, nil
		}
		return NewQEMU("")
	}
	return nil, fmt.Errorf("vmm: unknown VMM %q: want auto, cloud-hypervisor or qemu", name)
}

// tailFile returns the last n bytes of a file, for error messages (the console tail).
func tailFile(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := fi.Size() - n
	if off < 0 {
		off = 0
	}
	b := make([]byte, fi.Size()-off)
	f.ReadAt(b, off)
	return string(b)
}

// ConsoleTail returns the last lines of a VM's console log.
func ConsoleTail(spec Spec, lines int) string {
	s := strings.TrimRight(tailFile(spec.ConsoleLog(), 64<<10), "\n")
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// WaitSocket waits until a unix socket path exists (a VMM or helper creating its socket), ctx
// ends, or done is closed (the process that should create it exited).
func WaitSocket(ctx context.Context, path string, done <-chan struct{}) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-done:
			return errors.New("VMM exited before creating its socket")
		case <-t.C:
		}
	}
}
