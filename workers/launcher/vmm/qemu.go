package vmm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// QEMU drives qemu-system-x86_64. The default machine is microvm (virtio-mmio, fastest boot);
// Machine "q35" uses virtio-pci instead.
type QEMU struct {
	Binary  string
	Machine string // "microvm" (default) or "q35"
	Accel   Accel
}

// NewQEMU finds the QEMU binary (path "" searches $PATH) and the host's accelerator.
func NewQEMU(path string) (*QEMU, error) {
	if path == "" {
		path = "qemu-system-x86_64"
	}
	p, err := exec.LookPath(path)
	if err != nil {
		return nil, fmt.Errorf("vmm: qemu: %w (install qemu-system-x86)", err)
	}
	m := os.Getenv("VIRTKIT_QEMU_MACHINE")
	if m == "" {
		m = "microvm"
	}
	return &QEMU{Binary: p, Machine: m, Accel: HostAccel()}, nil
}

// Name implements Driver.
func (q *QEMU) Name() string { return "qemu" }

func (q *QEMU) qmpSocket(s Spec) string { return filepath.Join(s.Dir, "qmp.sock") }

// Args returns QEMU's command line for spec (exported for tests and `--dry-run`).
func (q *QEMU) Args(s Spec) []string {
	mem := strconv.Itoa(s.MemoryMiB) + "M"
	microvm := q.Machine != "q35"
	dev := func(kind string) string {
		if microvm {
			return kind + "-device"
		}
		return kind + "-pci"
	}
	a := []string{
		"-name", s.Name,
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-accel", q.Accel.Name,
		"-smp", strconv.Itoa(s.CPUs),
		"-m", mem,
		"-object", "memory-backend-memfd,id=mem,size=" + mem + ",share=on",
	}
	if microvm {
		a = append(a, "-M", "microvm,memory-backend=mem,rtc=on", "-global", "virtio-mmio.force-legacy=false")
	} else {
		a = append(a, "-M", "q35,memory-backend=mem")
	}
	if q.Accel.Name == "kvm" {
		a = append(a, "-cpu", "host")
	}
	cmdline := []string{"console=ttyS0", "reboot=t", "panic=-1", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd"}
	if microvm {
		cmdline = append(cmdline, "pci=off")
	}
	if q.Accel.Name == "tcg" && microvm {
		if khz := HostKHz(); khz > 0 {
			cmdline = append(cmdline, "tsc_early_khz="+strconv.Itoa(khz))
		}
	}
	if s.Cmdline != "" {
		cmdline = append(cmdline, s.Cmdline)
	}
	a = append(a, "-kernel", s.Kernel, "-append", strings.Join(cmdline, " "))
	if s.Initramfs != "" {
		a = append(a, "-initrd", s.Initramfs)
	}
	a = append(a,
		"-chardev", "file,id=con,path="+s.ConsoleLog(),
		"-serial", "chardev:con",
		"-qmp", "unix:"+q.qmpSocket(s)+",server=on,wait=off",
	)
	for i, d := range s.Disks {
		id := "d" + strconv.Itoa(i)
		drive := "id=" + id + ",file=" + escapeComma(d.Path) + ",format=raw,if=none,cache=unsafe,discard=unmap"
		if d.ReadOnly {
			drive += ",readonly=on"
		}
		a = append(a, "-drive", drive, "-device", dev("virtio-blk")+",drive="+id)
	}
	for i, sh := range s.Shares {
		id := "fs" + strconv.Itoa(i)
		a = append(a, "-chardev", "socket,id="+id+",path="+escapeComma(sh.Socket),
			"-device", dev("vhost-user-fs")+",chardev="+id+",tag="+sh.Tag+",queue-size=1024")
	}
	if s.VsockBackend != "" {
		a = append(a, "-chardev", "socket,id=vsock,path="+escapeComma(s.VsockBackend),
			"-device", dev("vhost-user-vsock")+",chardev=vsock")
	}
	for i, n := range s.NICs {
		id := "n" + strconv.Itoa(i)
		a = append(a, "-netdev", "tap,id="+id+",ifname="+n.Tap+",script=no,downscript=no",
			"-device", dev("virtio-net")+",netdev="+id+",mac="+n.MAC)
	}
	a = append(a, "-device", dev("virtio-rng"))
	return a
}

// escapeComma doubles commas, QEMU's escape inside option values.
func escapeComma(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// Start implements Driver: it starts QEMU and returns once the process runs. Readiness of the guest
// is the caller's business (the agent answering over vsock).
func (q *QEMU) Start(ctx context.Context, s Spec) (Machine, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	if s.VsockCID != 0 && s.VsockBackend == "" {
		return nil, errors.New("vmm: qemu: vsock needs the hybrid-vsock vhost-user backend socket (Spec.VsockBackend)")
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("vmm: qemu: %w", err)
	}
	log, err := os.OpenFile(s.VMMLog(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("vmm: qemu: %w", err)
	}
	defer log.Close()
	os.Remove(q.qmpSocket(s))
	cmd := exec.Command(q.Binary, q.Args(s)...)
	cmd.Stdout, cmd.Stderr = log, log
	fmt.Fprintf(log, "%s accel=%s (%s)\n%s %s\n", time.Now().Format(time.RFC3339Nano), q.Accel.Name, q.Accel.Reason, q.Binary, strings.Join(q.Args(s), " "))
	if err := startChild(cmd); err != nil {
		return nil, fmt.Errorf("vmm: start qemu: %w", err)
	}
	m := newProcMachine(cmd, s)
	m.shutdown = func(ctx context.Context) error { return qmpExecute(ctx, q.qmpSocket(s), "system_powerdown") }
	m.quit = func(ctx context.Context) error { return qmpExecute(ctx, q.qmpSocket(s), "quit") }
	return m, nil
}

// procMachine is a VMM child process.
type procMachine struct {
	cmd      *exec.Cmd
	spec     Spec
	done     chan struct{}
	err      error
	shutdown func(context.Context) error // polite: ask the guest to power off
	quit     func(context.Context) error // firm: ask the VMM to exit
	killOnce sync.Once
}

func newProcMachine(cmd *exec.Cmd, s Spec) *procMachine {
	m := &procMachine{cmd: cmd, spec: s, done: make(chan struct{})}
	os.WriteFile(s.PIDFile(), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600)
	go func() {
		err := cmd.Wait()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					err = fmt.Errorf("VMM killed by signal %d", ws.Signal())
				} else {
					err = fmt.Errorf("VMM exited with status %d: %s", ee.ExitCode(), strings.TrimSpace(tailFile(s.VMMLog(), 2048)))
				}
			}
		}
		m.err = err
		os.Remove(s.PIDFile())
		close(m.done)
	}()
	return m
}

func (m *procMachine) PID() int              { return m.cmd.Process.Pid }
func (m *procMachine) Done() <-chan struct{} { return m.done }
func (m *procMachine) Wait() error           { <-m.done; return m.err }

func (m *procMachine) Kill() error {
	m.killOnce.Do(func() {
		// The whole process group: QEMU and anything it forked.
		syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
	})
	<-m.done
	return nil
}

func (m *procMachine) Shutdown(ctx context.Context) error {
	select {
	case <-m.done:
		return nil
	default:
	}
	if m.shutdown != nil {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		m.shutdown(sctx)
		cancel()
	}
	select {
	case <-m.done:
		return nil
	case <-ctx.Done():
	}
	if m.quit != nil {
		qctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		m.quit(qctx)
		cancel()
		select {
		case <-m.done:
			return nil
		case <-time.After(2 * time.Second):
		}
	}
	return m.Kill()
}
