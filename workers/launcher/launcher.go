// Package launcher turns a request ("boot this root filesystem with these shares, this much memory")
// into a running microVM whose agent answers: it lays out the VM's state folder, makes the per-VM
// writable disk, starts the vhost-user helpers (virtio-fs per share; for QEMU the hybrid-vsock
// backend), starts the VMM through package vmm, and waits for the guest agent over vsock.
//
// Every process a VM owns is a child with a parent-death signal, recorded in a pid file in the VM's
// folder; Reconcile reaps what a crashed virtkit left behind. A Launcher is safe for concurrent use;
// each VM is owned by the caller that started it (Stop and Wait may be called from any goroutine).
package launcher

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/agent/proto"
	"github.com/virtkit/virtkit/switch/lan"
	"github.com/virtkit/virtkit/workers/launcher/vmm"
)

// GuestCID is every guest's vsock CID: each VM has its own hybrid-vsock device and socket, so CIDs
// never meet and need not be unique.
const GuestCID = 3

// Config configures a Launcher. Zero values take the documented defaults.
type Config struct {
	// StateDir holds one folder per VM under StateDir/vms/<name>.
	StateDir string
	// Kernel is the guest vmlinux.
	Kernel string
	// VMM is auto, qemu or cloud-hypervisor.
	VMM string
	// Virtkit is the virtkit binary used to run helper processes (virtiofsd, vsockd).
	// Default: the running executable.
	Virtkit string
	// NewDisk makes an empty ext4 image of size bytes at path (the per-VM writable layer).
	NewDisk func(ctx context.Context, path string, size int64) error
	// LANs serve the VMs' networks; nil means VMs get no network.
	LANs *LANs
	// ReadyTimeout bounds boot-to-agent time (default 3 minutes: TCG is slow).
	ReadyTimeout time.Duration
	Logger       zerolog.Logger
}

// Share exposes a host folder in the guest over virtio-fs.
type Share struct {
	HostDir  string `json:"host_dir"`
	GuestDir string `json:"guest_dir"`
	ReadOnly bool   `json:"read_only,omitempty"`
	// UIDMap and GIDMap map guest ids to host ids, "GUEST:HOST:COUNT" (virtiofsd's user-namespace
	// --uid-map/--gid-map), e.g. "0:1000:1" so files root makes in the guest belong to user 1000.
	UIDMap string `json:"uid_map,omitempty"`
	GIDMap string `json:"gid_map,omitempty"`
}

// Request describes a VM to boot.
type Request struct {
	Name   string `json:"name"`
	Rootfs string `json:"rootfs"` // read-only base image (ext4)
	// OverlayMiB is the size of the per-VM writable disk stacked over Rootfs (default 4096, sparse).
	OverlayMiB int `json:"overlay_mib,omitempty"`
	// Disks are extra read-write data disks (fleet volumes), /dev/vdc onwards.
	Disks     []string `json:"disks,omitempty"`
	CPUs      int      `json:"cpus"`
	MemoryMiB int      `json:"memory_mib"`
	// Mode is the agent's mode: agent (default: serve only) or entrypoint (run the image's command).
	Mode   string  `json:"mode,omitempty"`
	Shares []Share `json:"shares,omitempty"`
	// Net is the guest network (virtkit.net): "" or "none" for none, "dhcp" to join LAN through the
	// switch on vsock port 1025, or static:IP/PREFIX[,GW].
	Net string `json:"net,omitempty"`
	// LAN names the network to join (default "default"); VMs on one LAN see each other as <host>.lan.
	LAN string `json:"lan,omitempty"`
	// Host is the VM's name on its LAN and in the guest: its DNS name (<host>.lan), DHCP host name
	// and host name (default Name). It is unique per LAN, so VMs of different LANs may share one
	// (two fleets each with a unit "redis").
	Host string `json:"host,omitempty"`
	// Subnet (CIDR) is the subnet the LAN must have (default the launcher's): the first VM makes
	// the LAN with it; a LAN running on another subnet refuses the VM.
	Subnet string `json:"subnet,omitempty"`
	// Tap, when set, replaces the LAN: the VM's network is this pre-created tap device (an
	// operator's pool tap on their bridge), seen by the guest as its kernel NIC eth0 and configured
	// by the agent per Net (dhcp: a lease from the operator's network). The launcher neither makes
	// nor configures the tap; the caller leases it to one VM at a time.
	Tap string `json:"tap,omitempty"`
	// Forwards are host→guest TCP port forwards: HOST:PORT listens on the host, GuestPort in the VM.
	Forwards []PortForward `json:"forwards,omitempty"`
	// VMM overrides the launcher's VMM choice for this VM: auto, qemu or cloud-hypervisor.
	VMM string `json:"vmm,omitempty"`
	// Kernel overrides the launcher's guest kernel for this VM.
	Kernel string `json:"kernel,omitempty"`
	// Cmdline carries extra kernel command line words (virtkit.* keys).
	Cmdline []string `json:"cmdline,omitempty"`
}

// MAC is the guest NIC address of a tap-attached VM called name: locally administered, unicast,
// derived from the name so that it is stable across the VM's restarts and distinct between VMs.
func MAC(name string) string {
	h := sha256.Sum256([]byte("virtkit-mac:" + name))
	return fmt.Sprintf("02:%02x:%02x:%02x:%02x:%02x", h[0], h[1], h[2], h[3], h[4])
}

// PortForward carries connections to Listen (host address:port) to GuestPort in the VM.
type PortForward struct {
	Listen    string `json:"listen"`
	GuestPort uint16 `json:"guest_port"`
}

// maxCmdline bounds our part of the kernel command line: the x86 kernel's COMMAND_LINE_SIZE is
// 2048 bytes (NUL included), and the VMM driver adds its own words (console, reboot, …).
const maxCmdline = 2048 - 256

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

func (r *Request) validate() error {
	if !nameRE.MatchString(r.Name) {
		return fmt.Errorf("launcher: VM name %q: want 1-63 of a-z, 0-9 and -, starting with a letter or digit", r.Name)
	}
	if r.Host != "" && !nameRE.MatchString(r.Host) {
		return fmt.Errorf("launcher: VM %s: host name %q: want 1-63 of a-z, 0-9 and -", r.Name, r.Host)
	}
	if r.Subnet != "" {
		if _, err := netip.ParsePrefix(r.Subnet); err != nil {
			return fmt.Errorf("launcher: VM %s: subnet: %w", r.Name, err)
		}
	}
	if _, err := os.Stat(r.Rootfs); err != nil {
		return fmt.Errorf("launcher: rootfs: %w", err)
	}
	for _, s := range r.Shares {
		if !filepath.IsAbs(s.GuestDir) || strings.ContainsAny(s.GuestDir, " ,:\t\n") {
			return fmt.Errorf("launcher: share guest path %q: must be absolute, without spaces, commas or colons", s.GuestDir)
		}
		fi, err := os.Stat(s.HostDir)
		if err != nil {
			return fmt.Errorf("launcher: share: %w", err)
		}
		if !fi.IsDir() {
			return fmt.Errorf("launcher: share %s: not a folder", s.HostDir)
		}
	}
	return nil
}

// Launcher boots VMs.
type Launcher struct {
	cfg    Config
	driver vmm.Driver
	log    zerolog.Logger

	mu  sync.Mutex
	vms map[string]*VM
}

// New checks the configuration and picks the VMM driver.
func New(cfg Config) (*Launcher, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("launcher: StateDir is required")
	}
	if _, err := os.Stat(cfg.Kernel); err != nil {
		return nil, fmt.Errorf("launcher: kernel: %w (build it with ./build-kernel.sh or set vm.kernel)", err)
	}
	if cfg.Virtkit == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("launcher: %w", err)
		}
		cfg.Virtkit = exe
	}
	if cfg.NewDisk == nil {
		return nil, errors.New("launcher: NewDisk is required")
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 3 * time.Minute
	}
	d, err := vmm.Select(cfg.VMM)
	if err != nil {
		return nil, err
	}
	if q, ok := d.(*vmm.QEMU); ok {
		cfg.Logger.Info().Str("accel", q.Accel.Name).Str("why", q.Accel.Reason).Msg("qemu accelerator")
	}
	return &Launcher{cfg: cfg, driver: d, log: cfg.Logger, vms: map[string]*VM{}}, nil
}

// Driver is the VMM driver in use.
func (l *Launcher) Driver() vmm.Driver { return l.driver }

// VMDir is the state folder of the VM called name.
func (l *Launcher) VMDir(name string) string { return filepath.Join(l.cfg.StateDir, "vms", name) }

// VM is a booted microVM.
type VM struct {
	Name    string
	Dir     string
	Spec    vmm.Spec
	Request Request
	// ExecURL reaches the guest agent's exec server.
	ExecURL string
	// Timings of the boot.
	Timings Timings
	// IP is the VM's address on its LAN (invalid without network).
	IP netip.Addr

	lan      string
	forwards []string
	l        *Launcher
	driver   vmm.Driver
	machine  vmm.Machine
	helpers  []*helper
	stop     sync.Once
	stopErr  error
	// agent is the connection that saw the agent answer, until TakeAgent hands it over.
	agent client.Held
}

// Timings splits boot-to-ready.
type Timings struct {
	Prepare time.Duration `json:"prepare"` // folder, overlay disk, helpers
	VMM     time.Duration `json:"vmm"`     // VMM process start (+ API calls for CH)
	Ready   time.Duration `json:"ready"`   // VMM started → agent accepted on vsock
	Total   time.Duration `json:"total"`
}

// Start boots a VM and returns once its agent accepts connections. On error nothing is left behind.
func (l *Launcher) Start(ctx context.Context, req Request) (vm *VM, err error) {
	if err := req.validate(); err != nil {
		return nil, err
	}
	if req.CPUs == 0 {
		req.CPUs = 1
	}
	if req.MemoryMiB == 0 {
		req.MemoryMiB = 512
	}
	if req.OverlayMiB == 0 {
		req.OverlayMiB = 4096
	}
	if req.Mode == "" {
		req.Mode = "agent"
	}
	l.mu.Lock()
	if _, ok := l.vms[req.Name]; ok {
		l.mu.Unlock()
		return nil, fmt.Errorf("launcher: a VM called %q is running", req.Name)
	}
	vm = &VM{Name: req.Name, Dir: l.VMDir(req.Name), Request: req, l: l}
	l.vms[req.Name] = vm
	l.mu.Unlock()
	t0 := time.Now()
	log := l.log.With().Str("vm", req.Name).Logger()
	// The named result is nil by the time an error return runs this, so hold the VM here.
	started := vm
	defer func() {
		if err != nil {
			started.teardown(context.Background())
			err = fmt.Errorf("launcher: start %s: %w", req.Name, err)
		}
	}()

	if _, err := os.Stat(filepath.Join(vm.Dir, "vm.json")); err == nil {
		return nil, fmt.Errorf("state folder %s exists (a VM of that name is running elsewhere, or run `virtkit vm rm %s`)", vm.Dir, req.Name)
	}
	if err := os.MkdirAll(vm.Dir, 0o700); err != nil {
		return nil, err
	}
	if b, err := json.MarshalIndent(req, "", "  "); err == nil {
		os.WriteFile(filepath.Join(vm.Dir, "vm.json"), b, 0o600)
	}
	overlay := filepath.Join(vm.Dir, "overlay.ext4")
	if err := l.cfg.NewDisk(ctx, overlay, int64(req.OverlayMiB)<<20); err != nil {
		return nil, fmt.Errorf("overlay disk: %w", err)
	}
	driver := l.driver
	if req.VMM != "" && req.VMM != l.cfg.VMM {
		if driver, err = vmm.Select(req.VMM); err != nil {
			return nil, err
		}
	}
	kernel := l.cfg.Kernel
	if req.Kernel != "" {
		if _, err := os.Stat(req.Kernel); err != nil {
			return nil, fmt.Errorf("kernel: %w", err)
		}
		kernel = req.Kernel
	}
	vm.driver = driver
	spec := vmm.Spec{
		Name: req.Name, Dir: vm.Dir, Kernel: kernel, CPUs: req.CPUs, MemoryMiB: req.MemoryMiB,
		Disks:    []vmm.Disk{{Path: req.Rootfs, ReadOnly: true}, {Path: overlay}},
		VsockCID: GuestCID,
	}
	for _, d := range req.Disks {
		spec.Disks = append(spec.Disks, vmm.Disk{Path: d})
	}
	host := req.Host
	if host == "" {
		host = req.Name
	}
	cmdline := []string{"root=/dev/vda", "ro", "rootfstype=ext4", "init=/sbin/virtkit-agent",
		"virtkit.overlay=/dev/vdb", "virtkit.mode=" + req.Mode, "virtkit.hostname=" + host}
	if req.Net == "" {
		req.Net = "none"
	}
	if req.Tap != "" {
		if _, err := os.Stat(filepath.Join("/sys/class/net", filepath.Base(req.Tap))); err != nil || filepath.Base(req.Tap) != req.Tap {
			return nil, fmt.Errorf("tap %q: no such network interface (create it first: ip tuntap add %s mode tap user USER)", req.Tap, req.Tap)
		}
		if req.Net == "none" {
			return nil, errors.New("a tap without a network mode: want Net dhcp or static")
		}
		spec.NICs = []vmm.NIC{{Tap: req.Tap, MAC: MAC(req.Name)}}
		cmdline = append(cmdline, "virtkit.nic=eth0")
	} else if req.Net != "none" {
		if l.cfg.LANs == nil {
			return nil, errors.New("networking asked for, but this launcher has no LANs")
		}
		if req.LAN == "" {
			req.LAN = "default"
		}
		subnet, _ := netip.ParsePrefix(req.Subnet) // validated
		ip, err := l.cfg.LANs.Join(req.LAN, Member{VM: req.Name, Host: host, Subnet: subnet,
			Socket: filepath.Join(vm.Dir, "vsock.sock_"+strconv.Itoa(addr.PortNet))})
		if err != nil {
			return nil, err
		}
		vm.IP = ip
		vm.lan = req.LAN
		if sw, ok := l.cfg.LANs.Switch(req.LAN); ok {
			for _, f := range req.Forwards {
				lf := lan.Forward{Proto: "tcp", Listen: f.Listen, Name: host, Port: f.GuestPort}
				if err := sw.AddForward(lf); err != nil {
					return nil, err
				}
				vm.forwards = append(vm.forwards, f.Listen)
			}
		}
	}
	cmdline = append(cmdline, "virtkit.net="+req.Net)
	var fsKeys []string
	for i, s := range req.Shares {
		tag := "vkfs" + strconv.Itoa(i)
		sock := filepath.Join(vm.Dir, tag+".sock")
		args := []string{"virtiofsd", "--socket-path", sock, "--shared-dir", s.HostDir}
		if s.ReadOnly {
			args = append(args, "--readonly")
		}
		if s.UIDMap != "" {
			args = append(args, "--uid-map", s.UIDMap)
		}
		if s.GIDMap != "" {
			args = append(args, "--gid-map", s.GIDMap)
		}
		if _, err := vm.startHelper(ctx, tag, sock, args...); err != nil {
			return nil, err
		}
		spec.Shares = append(spec.Shares, vmm.Share{Tag: tag, Socket: sock})
		k := tag + ":" + s.GuestDir
		if s.ReadOnly {
			k += ":ro"
		}
		fsKeys = append(fsKeys, k)
	}
	if len(fsKeys) > 0 {
		cmdline = append(cmdline, "virtkit.fs="+strings.Join(fsKeys, ","))
	}
	cmdline = append(cmdline, req.Cmdline...)
	spec.Cmdline = strings.Join(cmdline, " ")
	if len(spec.Cmdline) >= maxCmdline {
		// The kernel would cut it silently, and the guest would boot with half its keys.
		return nil, fmt.Errorf("kernel command line is %d bytes, over the %d left by the kernel's limit (long virtkit.command/env or SSH keys?)", len(spec.Cmdline), maxCmdline-1)
	}
	if driver.Name() == "qemu" {
		sock := filepath.Join(vm.Dir, "vsock.vhost")
		if _, err := vm.startHelper(ctx, "vsockd", sock, "vsockd", "--socket", sock, "--uds", spec.VsockSocket(), "--cid", strconv.Itoa(GuestCID)); err != nil {
			return nil, err
		}
		spec.VsockBackend = sock
	}
	vm.Spec = spec
	vm.ExecURL = fmt.Sprintf("hvsock://%s:%d", spec.VsockSocket(), addr.PortExec)
	vm.Timings.Prepare = time.Since(t0)

	t1 := time.Now()
	m, err := driver.Start(ctx, spec)
	if err != nil {
		return nil, err
	}
	vm.machine = m
	vm.Timings.VMM = time.Since(t1)
	t2 := time.Now()
	if err := vm.waitAgent(ctx); err != nil {
		return nil, err
	}
	vm.Timings.Ready = time.Since(t2)
	vm.Timings.Total = time.Since(t0)
	log.Info().Dur("prepare", vm.Timings.Prepare).Dur("vmm", vm.Timings.VMM).Dur("ready", vm.Timings.Ready).Msg("vm ready")
	return vm, nil
}

// waitAgent dials the agent's exec port until the guest accepts, the VMM dies or time runs out.
func (vm *VM) waitAgent(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, vm.l.cfg.ReadyTimeout)
	defer cancel()
	for {
		dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := client.Dial(dctx, vm.ExecURL)
		dcancel()
		if err == nil {
			vm.agent.Put(c)
			return nil
		}
		var pe *proto.VersionError
		if errors.As(err, &pe) {
			return err // an agent of another protocol version: waiting will not help
		}
		select {
		case <-vm.machine.Done():
			if err := vm.machine.Wait(); err == nil && vm.Request.Mode == "entrypoint" {
				return nil // the entrypoint ran and powered the VM off before we looked: not a failure
			}
			return fmt.Errorf("VMM exited before the agent answered: %v\nconsole:\n%s", vm.machine.Wait(), vmm.ConsoleTail(vm.Spec, 30))
		case <-ctx.Done():
			return fmt.Errorf("agent did not answer on %s: %w\nconsole:\n%s", vm.ExecURL, ctx.Err(), vmm.ConsoleTail(vm.Spec, 30))
		case <-time.After(25 * time.Millisecond):
		}
		for _, h := range vm.helpers {
			if h.exited() {
				return fmt.Errorf("helper %s exited: %s", h.name, tailLog(h.log))
			}
		}
	}
}

// TakeAgent hands over the connection on which the agent first answered (nil after the first
// call, or when the VM booted in entrypoint mode and powered off at once): a caller that talks to
// the agent right after Start saves a dial. The caller closes it.
func (vm *VM) TakeAgent() *client.Client { return vm.agent.Take() }

// Done is closed when the VMM exits.
func (vm *VM) Done() <-chan struct{} { return vm.machine.Done() }

// Wait blocks until the VMM exits, then tears the VM down and reports the VMM's exit.
func (vm *VM) Wait() error {
	err := vm.machine.Wait()
	vm.teardown(context.Background())
	return err
}

// PID is the VMM's process id.
func (vm *VM) PID() int { return vm.machine.PID() }

// ConsoleTail returns the last lines of the guest console.
func (vm *VM) ConsoleTail(lines int) string { return vmm.ConsoleTail(vm.Spec, lines) }

// Stop powers the VM off (politely, then firmly within ctx), stops its helpers and removes its
// state folder. It is safe to call more than once.
func (vm *VM) Stop(ctx context.Context) error { return vm.teardown(ctx) }

// Kill stops the VMM at once (used when the VM is lost or for fault tests), then tears down.
func (vm *VM) Kill() error {
	if vm.machine != nil {
		vm.machine.Kill()
	}
	return vm.teardown(context.Background())
}

// PowerOff asks the guest agent for an orderly power-off (sync, unmount) and waits for the VMM to
// exit, up to ctx; then the VMM is asked (ACPI, QMP/API) and finally killed.
func (vm *VM) PowerOff(ctx context.Context) error {
	if vm.machine == nil {
		return nil
	}
	select {
	case <-vm.machine.Done():
		return nil
	default:
	}
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	if c, err := client.Dial(actx, vm.ExecURL); err == nil {
		c.Shutdown(actx, true)
		c.Close()
		select {
		case <-vm.machine.Done():
			cancel()
			return nil
		case <-actx.Done():
		}
	}
	cancel()
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	defer scancel()
	return vm.machine.Shutdown(sctx)
}

func (vm *VM) teardown(ctx context.Context) error {
	vm.stop.Do(func() {
		if c := vm.TakeAgent(); c != nil {
			c.Close()
		}
		if vm.machine != nil {
			vm.stopErr = vm.PowerOff(ctx)
		}
		for _, h := range vm.helpers {
			h.kill()
		}
		if vm.lan != "" {
			if sw, ok := vm.l.cfg.LANs.Switch(vm.lan); ok {
				for _, f := range vm.forwards {
					sw.RemoveForward(f)
				}
			}
			vm.l.cfg.LANs.Detach(vm.lan, vm.Name)
		}
		if err := os.RemoveAll(vm.Dir); err != nil && vm.stopErr == nil {
			vm.stopErr = err
		}
		vm.l.mu.Lock()
		delete(vm.l.vms, vm.Name)
		vm.l.mu.Unlock()
	})
	return vm.stopErr
}

// helper is a vhost-user backend process of a VM.
type helper struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func (h *helper) exited() bool {
	select {
	case <-h.done:
		return true
	default:
		return false
	}
}

func (h *helper) kill() {
	syscall.Kill(-h.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-h.done:
	case <-time.After(3 * time.Second):
		syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
		<-h.done
	}
}

// startHelper runs `virtkit ARGS…` as a child of this process and waits for its socket to appear.
func (vm *VM) startHelper(ctx context.Context, name, socket string, args ...string) (*helper, error) {
	logPath := filepath.Join(vm.Dir, name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(vm.l.cfg.Virtkit, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "VIRTKIT_LOG_LEVEL=info")
	if err := vmm.StartChild(cmd); err != nil {
		return nil, fmt.Errorf("helper %s: %w", name, err)
	}
	h := &helper{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { cmd.Wait(); close(h.done) }()
	vm.helpers = append(vm.helpers, h)
	os.WriteFile(filepath.Join(vm.Dir, name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600)
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := vmm.WaitSocket(wctx, socket, h.done); err != nil {
		return nil, fmt.Errorf("helper %s did not listen on %s: %s", name, socket, tailLog(logPath))
	}
	return h, nil
}

func tailLog(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return strings.TrimSpace(string(b))
}
