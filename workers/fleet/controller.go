package fleet

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/internal/flock"
	"github.com/virtkit/virtkit/workers/launcher"
)

// Image is a converted unit image: its read-only root filesystem and its OCI config.
type Image struct {
	Rootfs     string
	Entrypoint []string
	Cmd        []string
	Env        []string
	WorkingDir string
	User       string
}

// ControllerConfig configures a Controller.
type ControllerConfig struct {
	// Client reaches the broker; VMs are launched and stopped on its host.
	Client *broker.Client
	// StateDir is virtkit's state folder: fleets live under StateDir/fleets/<fleet>, VMs under
	// StateDir/vms/<vm>.
	StateDir string
	// Convert turns an image reference into a bootable image (cached by the caller's store).
	Convert func(ctx context.Context, ref string) (Image, error)
	// NewVolume makes an empty journaled ext4 file system of size bytes at path.
	NewVolume func(ctx context.Context, path string, size int64) error
	// CPUs and MemoryMiB are the defaults for units that do not say.
	CPUs, MemoryMiB int
	Log             zerolog.Logger
}

// Controller applies fleets: it converts images, makes volumes, boots units in dependency order
// through the broker's launcher work (each unit's command is its VM's entrypoint), waits for their
// health checks, and
// keeps the applied definition under the state dir. It is safe for concurrent use; operations on
// one fleet are serialized.
type Controller struct {
	cfg ControllerConfig

	mu    sync.Mutex
	locks map[string]*sync.Mutex
}

// NewController returns a Controller.
func NewController(cfg ControllerConfig) *Controller {
	if cfg.CPUs == 0 {
		cfg.CPUs = 1
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 512
	}
	return &Controller{cfg: cfg, locks: map[string]*sync.Mutex{}}
}

func (c *Controller) lock(ctx context.Context, fleet string) (func(), error) {
	c.mu.Lock()
	l := c.locks[fleet]
	if l == nil {
		l = &sync.Mutex{}
		c.locks[fleet] = l
	}
	c.mu.Unlock()
	l.Lock()
	unlockFile, err := c.lockFile(ctx, fleet)
	if err != nil {
		l.Unlock()
		return nil, err
	}
	return func() {
		unlockFile()
		l.Unlock()
	}, nil
}

// lockFile takes the fleet's lock across processes: a flock on StateDir/fleets/<fleet>.lock,
// waiting until ctx ends. A `virtkit fleet up` and a daemon that starts meanwhile and resumes
// the same fleet are two controllers; without it both converged at once, and the later one took
// the unit the other was booting for a changed one and was refused its launch. The file stays
// when a fleet is purged (removing a lock file others may be waiting on would split the lock).
func (c *Controller) lockFile(ctx context.Context, fleet string) (func(), error) {
	dir := filepath.Join(c.cfg.StateDir, "fleets")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("fleet %s: lock: %w", fleet, err)
	}
	unlock, err := flock.Lock(ctx, filepath.Join(dir, fleet+".lock"))
	if err != nil {
		if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
			return nil, fmt.Errorf("fleet %s: waiting for another process working on it: %w", fleet, err)
		}
		return nil, fmt.Errorf("fleet %s: lock: %w", fleet, err)
	}
	return unlock, nil
}

// Applied is a fleet as last applied: stored as StateDir/fleets/<name>/fleet.json beside the
// fleet file it came from (fleet.yaml), so a restarted daemon or host knows it.
type Applied struct {
	Name   string `json:"name"`
	Source string `json:"source"` // the fleet file's path
	// Subnet is the fleet file's subnet ("" for the daemon's default).
	Subnet string `json:"subnet,omitempty"`
	// Up is false after `fleet down`.
	Up    bool                    `json:"up"`
	Units map[string]*AppliedUnit `json:"units"`
}

// AppliedUnit is a unit resolved to what the host runs.
type AppliedUnit struct {
	Request launcher.Request `json:"request"`
	// Mounts are the volumes: Disk is the guest device, Path the mount point (the agent mounts
	// them at boot: virtkit.volume).
	Mounts []Mount        `json:"mounts,omitempty"`
	Health *AppliedHealth `json:"health,omitempty"`
	// SSH: the unit runs the image's sshd with ssh_keys authorized for root. SSHIdentities are
	// the private keys beside the .pub files ssh_keys named (for `fleet ssh`).
	SSH           bool        `json:"ssh,omitempty"`
	SSHIdentities []string    `json:"ssh_identities,omitempty"`
	Autostart     bool        `json:"autostart"`
	Virtctl       VirtctlList `json:"virtctl"`
	DependsOn     []string    `json:"depends_on,omitempty"`
	// Hash of the effective spec: a unit whose hash is unchanged is left running by `up`.
	Hash string `json:"hash"`
}

// Mount is a volume of a unit.
type Mount struct {
	Volume string `json:"volume"`
	File   string `json:"file"`
	Disk   string `json:"disk"`
	Path   string `json:"path"`
}

// AppliedHealth is a health check with defaults filled in.
type AppliedHealth struct {
	Test     []string      `json:"test"`
	Interval time.Duration `json:"interval"`
	Timeout  time.Duration `json:"timeout"`
	Retries  int           `json:"retries"`
}

// MarshalJSON and UnmarshalJSON keep VirtctlList's YAML forms (true, false, a list).
func (v VirtctlList) MarshalJSON() ([]byte, error) {
	if v.All || len(v.Units) == 0 {
		return json.Marshal(v.All)
	}
	return json.Marshal(v.Units)
}

func (v *VirtctlList) UnmarshalJSON(b []byte) error {
	*v = VirtctlList{}
	if err := json.Unmarshal(b, &v.All); err == nil {
		return nil
	}
	return json.Unmarshal(b, &v.Units)
}

// Dir is where fleet name keeps its definition and volumes.
func (c *Controller) Dir(name string) string { return filepath.Join(c.cfg.StateDir, "fleets", name) }

// VMName is the host's name of a unit's VM: <fleet>-<unit>, unique on the host. On the fleet's LAN
// (and as the guest's host name) the VM is just <unit>, so units resolve as <unit>.lan.
func VMName(fleet, unit string) string { return fleet + "-" + unit }

func (c *Controller) vmDir(vm string) string { return filepath.Join(c.cfg.StateDir, "vms", vm) }

// ExecURL reaches the agent of a running VM on this host.
func (c *Controller) ExecURL(vm string) string {
	return fmt.Sprintf("hvsock://%s:%d", filepath.Join(c.vmDir(vm), "vsock.sock"), addr.PortExec)
}

// ControlSocket is the host listener of a VM's guest→host fleet control port.
func (c *Controller) ControlSocket(vm string) string {
	return filepath.Join(c.vmDir(vm), "vsock.sock_"+strconv.Itoa(addr.PortControl))
}

// Running reports whether the VM's folder exists on this host (the launcher removes it when the
// VM ends).
func (c *Controller) Running(vm string) bool {
	_, err := os.Stat(filepath.Join(c.vmDir(vm), "vm.json"))
	return err == nil
}

// Load reads fleet name's applied definition.
func (c *Controller) Load(name string) (*Applied, error) {
	b, err := os.ReadFile(filepath.Join(c.Dir(name), "fleet.json"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("fleet %s: not applied on this host (run `virtkit fleet up`)", name)
		}
		return nil, fmt.Errorf("fleet %s: %w", name, err)
	}
	var a Applied
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, fmt.Errorf("fleet %s: fleet.json: %w", name, err)
	}
	return &a, nil
}

// List names the fleets applied on this host.
func (c *Controller) List() []string {
	ents, _ := os.ReadDir(filepath.Join(c.cfg.StateDir, "fleets"))
	var out []string
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(c.Dir(e.Name()), "fleet.json")); err == nil {
			out = append(out, e.Name())
		}
	}
	return out
}

// Owner finds the fleet and unit a VM belongs to.
func (c *Controller) Owner(vm string) (*Applied, string, bool) {
	for _, name := range c.List() {
		a, err := c.Load(name)
		if err != nil {
			continue
		}
		for u, au := range a.Units {
			if au.Request.Name == vm {
				return a, u, true
			}
		}
	}
	return nil, "", false
}

func (c *Controller) save(a *Applied, source []byte) error {
	dir := c.Dir(a.Name)
	if err := os.MkdirAll(filepath.Join(dir, "volumes"), 0o700); err != nil {
		return fmt.Errorf("fleet %s: %w", a.Name, err)
	}
	if source != nil {
		if err := writeAtomic(filepath.Join(dir, "fleet.yaml"), source); err != nil {
			return fmt.Errorf("fleet %s: %w", a.Name, err)
		}
	}
	b, err := json.MarshalIndent(a, "", "  ")
	if err != nil {
		return fmt.Errorf("fleet %s: encode: %w", a.Name, err)
	}
	if err := writeAtomic(filepath.Join(dir, "fleet.json"), b); err != nil {
		return fmt.Errorf("fleet %s: %w", a.Name, err)
	}
	return nil
}

func writeAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Resolve converts a fleet file's images, makes missing volumes and computes each unit's
// effective spec and hash.
func (c *Controller) Resolve(ctx context.Context, f *File) (*Applied, error) {
	a := &Applied{Name: f.Name, Source: f.Path, Subnet: f.Subnet, Up: true, Units: map[string]*AppliedUnit{}}
	images := map[string]Image{}
	for _, name := range f.Order() {
		u := f.Units[name]
		img, ok := images[u.Image]
		if !ok {
			var err error
			if img, err = c.cfg.Convert(ctx, u.Image); err != nil {
				return nil, fmt.Errorf("fleet %s: unit %s: image %s: %w", f.Name, name, u.Image, err)
			}
			images[u.Image] = img
		}
		au, err := c.resolveUnit(ctx, f, name, u, img)
		if err != nil {
			return nil, fmt.Errorf("fleet %s: unit %s: %w", f.Name, name, err)
		}
		a.Units[name] = au
	}
	return a, nil
}

func (c *Controller) resolveUnit(ctx context.Context, f *File, name string, u *Unit, img Image) (*AppliedUnit, error) {
	req := launcher.Request{Name: VMName(f.Name, name), Host: name, Rootfs: img.Rootfs, CPUs: u.CPUs, MemoryMiB: u.Memory.MiB(),
		Net: "dhcp", LAN: "fleet-" + f.Name, Subnet: f.Subnet}
	if req.CPUs == 0 {
		req.CPUs = c.cfg.CPUs
	}
	if req.MemoryMiB == 0 {
		req.MemoryMiB = c.cfg.MemoryMiB
	}
	for _, s := range u.Shares {
		host := s.Host
		if !filepath.IsAbs(host) {
			host = filepath.Join(f.Dir, host)
		}
		if err := os.MkdirAll(host, 0o755); err != nil {
			return nil, fmt.Errorf("share %s: %w", s.Host, err)
		}
		req.Shares = append(req.Shares, launcher.Share{HostDir: host, GuestDir: s.Guest, ReadOnly: s.ReadOnly, UIDMap: s.UIDMap, GIDMap: s.GIDMap})
	}
	for _, p := range u.Ports {
		req.Forwards = append(req.Forwards, launcher.PortForward{Listen: fmt.Sprintf("%s:%d", p.HostIP, p.HostPort), GuestPort: uint16(p.GuestPort)})
	}
	au := &AppliedUnit{Virtctl: u.Virtctl, Autostart: u.Autostart == nil || *u.Autostart, DependsOn: u.DependsOn}
	au.SSH = len(u.SSHKeys) > 0
	for _, k := range u.SSHKeys {
		k = strings.TrimSpace(k)
		if strings.HasPrefix(k, "@") || strings.HasPrefix(k, "/") || strings.HasPrefix(k, "~") {
			path := strings.TrimPrefix(k, "@")
			if strings.HasPrefix(path, "~/") {
				home, _ := os.UserHomeDir()
				path = filepath.Join(home, path[2:])
			} else if !filepath.IsAbs(path) {
				path = filepath.Join(f.Dir, path)
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return nil, fmt.Errorf("ssh key: %w", err)
			}
			k = strings.TrimSpace(string(b))
			if priv, ok := strings.CutSuffix(path, ".pub"); ok {
				if _, err := os.Stat(priv); err == nil {
					au.SSHIdentities = append(au.SSHIdentities, priv)
				}
			}
		}
		req.Cmdline = append(req.Cmdline, "virtkit.ssh_key=b64:"+base64.StdEncoding.EncodeToString([]byte(k)))
	}
	for i, v := range u.Volumes {
		file := filepath.Join(c.Dir(f.Name), "volumes", name+"-"+v.Name+".ext4")
		if _, err := os.Stat(file); errors.Is(err, os.ErrNotExist) {
			if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
				return nil, err
			}
			if err := c.cfg.NewVolume(ctx, file, v.Size.Bytes); err != nil {
				return nil, fmt.Errorf("volume %s: %w", v.Name, err)
			}
		} else if err != nil {
			return nil, fmt.Errorf("volume %s: %w", v.Name, err)
		}
		req.Disks = append(req.Disks, file)
		au.Mounts = append(au.Mounts, Mount{Volume: v.Name, File: file, Disk: "/dev/vd" + string(rune('c'+i)), Path: v.Path})
	}
	// Entrypoint mode: the unit's command (or the image's) is the VM's main process, its exit the
	// unit's exit, its output on the console (`fleet logs`). The agent mounts the volumes and
	// applies command and env before it starts it (boot keys, b64 JSON: no quoting survives the
	// kernel command line). Agent mode (a builder) runs nothing of its own; env and volumes apply
	// to its exec sessions.
	mode := u.Mode
	if mode == "" {
		mode = "entrypoint"
		if len(u.Shares) > 0 && len(u.Command) == 0 {
			mode = "agent" // a builder: a machine to work in
		}
	}
	if mode == "entrypoint" && len(u.Command) == 0 && len(img.Entrypoint)+len(img.Cmd) == 0 {
		return nil, errors.New("the image has no entrypoint or cmd: give the unit a command")
	}
	if len(au.Mounts) > 0 {
		keys := make([]string, len(au.Mounts))
		for i, m := range au.Mounts {
			keys[i] = m.Disk + ":" + m.Path
		}
		req.Cmdline = append(req.Cmdline, "virtkit.volume="+strings.Join(keys, ","))
	}
	if len(u.Command) > 0 {
		b, _ := json.Marshal(u.Command)
		req.Cmdline = append(req.Cmdline, "virtkit.command=b64:"+base64.StdEncoding.EncodeToString(b))
	}
	if len(u.Env) > 0 {
		keys := make([]string, 0, len(u.Env))
		for k := range u.Env {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		env := make([]string, len(keys))
		for i, k := range keys {
			env[i] = k + "=" + u.Env[k]
		}
		b, _ := json.Marshal(env)
		req.Cmdline = append(req.Cmdline, "virtkit.env=b64:"+base64.StdEncoding.EncodeToString(b))
	}
	req.Mode = mode
	if h := u.Health; h != nil {
		ah := &AppliedHealth{Test: h.Test, Interval: h.Interval.D, Timeout: h.Timeout.D, Retries: h.Retries}
		if ah.Interval == 0 {
			ah.Interval = time.Second
		}
		if ah.Timeout == 0 {
			ah.Timeout = 10 * time.Second
		}
		if ah.Retries == 0 {
			ah.Retries = 60
		}
		au.Health = ah
	}
	b, _ := json.Marshal(struct {
		R launcher.Request
		M []Mount
		H *AppliedHealth
		V VirtctlList
	}{req, au.Mounts, au.Health, au.Virtctl})
	sum := sha256.Sum256(b)
	au.Hash = hex.EncodeToString(sum[:8])
	au.Request = req
	return au, nil
}

// Progress reports what an operation does, one line per step (nil: quiet).
type Progress func(unit, msg string)

// Up converges fleet f to its file: units whose effective spec changed (or that are not
// running) are (re)started in dependency order, each waiting for its health check before its
// dependents boot; unchanged running units are left alone; units no longer in the file stop.
func (c *Controller) Up(ctx context.Context, f *File, source []byte, p Progress) error {
	a, err := c.Resolve(ctx, f)
	if err != nil {
		return err
	}
	if err := c.checkOthers(a); err != nil {
		return err
	}
	unlock, err := c.lock(ctx, a.Name)
	if err != nil {
		return err
	}
	defer unlock()
	prev, _ := c.Load(a.Name)
	if err := c.save(a, source); err != nil {
		return err
	}
	return c.converge(ctx, a, prev, f.Order(), p)
}

// checkOthers refuses a fleet whose subnet overlaps the subnet of another fleet that is up, or
// whose VM names (<fleet>-<unit>) another fleet uses ("a-b" + "c" and "a" + "b-c").
func (c *Controller) checkOthers(a *Applied) error {
	var mine netip.Prefix
	if a.Subnet != "" {
		var err error
		if mine, err = netip.ParsePrefix(a.Subnet); err != nil {
			return fmt.Errorf("fleet %s: subnet: %w", a.Name, err)
		}
	}
	for _, name := range c.List() {
		o, err := c.Load(name)
		if err != nil || name == a.Name {
			continue
		}
		for unit, u := range a.Units {
			for ounit, ou := range o.Units {
				if ou.Request.Name == u.Request.Name {
					return fmt.Errorf("fleet %s: unit %s's VM name %s is fleet %s's unit %s (rename a unit or a fleet)", a.Name, unit, u.Request.Name, name, ounit)
				}
			}
		}
		if !mine.IsValid() || !o.Up || o.Subnet == "" {
			continue
		}
		if p, err := netip.ParsePrefix(o.Subnet); err == nil && p.Overlaps(mine) {
			return fmt.Errorf("fleet %s: subnet %s overlaps subnet %s of fleet %s (from %s); give one of them another subnet, or `virtkit fleet down --name %s` first",
				a.Name, a.Subnet, o.Subnet, name, o.Source, name)
		}
	}
	return nil
}

// Resume brings fleet name back after a daemon or host restart: the stored definition's
// autostart units that are not running are started.
func (c *Controller) Resume(ctx context.Context, name string, p Progress) error {
	unlock, err := c.lock(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	a, err := c.Load(name)
	if err != nil || !a.Up {
		return err
	}
	return c.converge(ctx, a, a, a.order(), p)
}

func (a *Applied) order() []string {
	f := &File{Units: map[string]*Unit{}}
	for n, u := range a.Units {
		f.Units[n] = &Unit{DependsOn: u.DependsOn}
	}
	return f.Order()
}

func (c *Controller) converge(ctx context.Context, a, prev *Applied, order []string, p Progress) error {
	if p == nil {
		p = func(string, string) {}
	}
	if prev != nil {
		for name, pu := range prev.Units {
			if _, ok := a.Units[name]; !ok && c.Running(pu.Request.Name) {
				p(name, "removed from the fleet file: stopping")
				if err := c.stopVM(ctx, pu.Request.Name); err != nil {
					return err
				}
			}
		}
	}
	// Units of one dependency level boot together; a level starts when the one before is
	// healthy.
	for _, level := range a.levels(order) {
		g, gctx := errgroup.WithContext(ctx)
		for _, name := range level {
			g.Go(func() error { return c.convergeUnit(gctx, a, prev, name, p) })
		}
		if err := g.Wait(); err != nil {
			return err
		}
	}
	return nil
}

func (c *Controller) convergeUnit(ctx context.Context, a, prev *Applied, name string, p Progress) error {
	u := a.Units[name]
	running := c.Running(u.Request.Name)
	if running && prev != nil && prev.Units[name] != nil && prev.Units[name].Hash == u.Hash {
		p(name, "unchanged")
		return nil
	}
	if !u.Autostart && !running {
		p(name, "autostart off: not started")
		return nil
	}
	if running {
		p(name, "changed: restarting")
		if err := c.stopVM(ctx, u.Request.Name); err != nil {
			return err
		}
	}
	return c.startUnit(ctx, a, name, p)
}

// levels groups units by dependency depth (order is dependencies first).
func (a *Applied) levels(order []string) [][]string {
	depth := map[string]int{}
	var out [][]string
	for _, n := range order {
		d := 0
		for _, dep := range a.Units[n].DependsOn {
			if depth[dep]+1 > d {
				d = depth[dep] + 1
			}
		}
		depth[n] = d
		for len(out) <= d {
			out = append(out, nil)
		}
		out[d] = append(out[d], n)
	}
	return out
}

// Down stops every unit of fleet name; its definition and volumes stay (Up or Resume brings it
// back). With purge the definition and volumes are removed as well.
func (c *Controller) Down(ctx context.Context, name string, purge bool, p Progress) error {
	unlock, err := c.lock(ctx, name)
	if err != nil {
		return err
	}
	defer unlock()
	a, err := c.Load(name)
	if err != nil {
		return err
	}
	if p == nil {
		p = func(string, string) {}
	}
	order := a.order()
	var errs []error
	for i := len(order) - 1; i >= 0; i-- {
		u := a.Units[order[i]]
		if c.Running(u.Request.Name) {
			p(order[i], "stopping")
			if err := c.stopVM(ctx, u.Request.Name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if purge {
		return os.RemoveAll(c.Dir(name))
	}
	a.Up = false
	return c.save(a, nil)
}

// StartUnit starts one unit of a fleet (no-op when it runs) and waits for its health check.
func (c *Controller) StartUnit(ctx context.Context, fleet, unit string, p Progress) error {
	unlock, err := c.lock(ctx, fleet)
	if err != nil {
		return err
	}
	defer unlock()
	a, err := c.Load(fleet)
	if err != nil {
		return err
	}
	if a.Units[unit] == nil {
		return fmt.Errorf("fleet %s: no unit %q", fleet, unit)
	}
	if c.Running(a.Units[unit].Request.Name) {
		return nil
	}
	if p == nil {
		p = func(string, string) {}
	}
	return c.startUnit(ctx, a, unit, p)
}

// StopUnit stops one unit of a fleet (its volumes stay).
func (c *Controller) StopUnit(ctx context.Context, fleet, unit string) error {
	unlock, err := c.lock(ctx, fleet)
	if err != nil {
		return err
	}
	defer unlock()
	a, err := c.Load(fleet)
	if err != nil {
		return err
	}
	u := a.Units[unit]
	if u == nil {
		return fmt.Errorf("fleet %s: no unit %q", fleet, unit)
	}
	if !c.Running(u.Request.Name) {
		return nil
	}
	return c.stopVM(ctx, u.Request.Name)
}

func (c *Controller) startUnit(ctx context.Context, a *Applied, name string, p Progress) error {
	u := a.Units[name]
	vm := u.Request.Name
	t0 := time.Now()
	p(name, "booting")
	ready, err := c.launch(ctx, u.Request)
	if err != nil {
		return fmt.Errorf("fleet %s: unit %s: %w", a.Name, name, err)
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	err = c.postStart(pctx, u)
	cancel()
	if err != nil {
		return fmt.Errorf("fleet %s: unit %s: %w", a.Name, name, err)
	}
	if u.Health != nil {
		p(name, fmt.Sprintf("up at %s in %s; waiting for health", ready.IP, time.Since(t0).Round(time.Millisecond)))
		if err := c.waitHealthy(ctx, vm, u.Health); err != nil {
			return fmt.Errorf("fleet %s: unit %s: %w", a.Name, name, err)
		}
	}
	p(name, fmt.Sprintf("ready at %s in %s", ready.IP, time.Since(t0).Round(time.Millisecond)))
	return nil
}

// postStart links virtctl in units that may use it (through the agent's exec server, which
// serves in every mode).
func (c *Controller) postStart(ctx context.Context, u *AppliedUnit) error {
	if !u.Virtctl.Enabled() {
		return nil
	}
	ag, err := c.dial(ctx, u.Request.Name)
	if err != nil {
		return err
	}
	defer ag.Close()
	var out bytes.Buffer
	link := "mkdir -p /usr/local/bin && ln -sf /sbin/virtkit-agent /usr/local/bin/virtctl"
	st, err := ag.Exec(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", link}}, nil, &out, &out)
	if err != nil {
		return fmt.Errorf("link virtctl: %w", err)
	}
	if st.Code != 0 {
		return fmt.Errorf("link virtctl exited %d: %s", st.Code, strings.TrimSpace(out.String()))
	}
	return nil
}

// dial reaches a VM's agent, retrying attempts that stall (each gets 15 s) until ctx ends.
func (c *Controller) dial(ctx context.Context, vm string) (*client.Client, error) {
	for {
		dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		ag, err := client.Dial(dctx, c.ExecURL(vm))
		cancel()
		if err == nil {
			return ag, nil
		}
		if ctx.Err() != nil || !c.Running(vm) {
			return nil, err
		}
		c.cfg.Log.Warn().Err(err).Str("vm", vm).Msg("agent did not answer; retrying")
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// Check runs a unit's health check once.
func (c *Controller) Check(ctx context.Context, vm string, h *AppliedHealth) error {
	ctx, cancel := context.WithTimeout(ctx, h.Timeout)
	defer cancel()
	ag, err := client.Dial(ctx, c.ExecURL(vm))
	if err != nil {
		return err
	}
	defer ag.Close()
	var out bytes.Buffer
	st, err := ag.Exec(ctx, client.ExecRequest{Argv: h.Test}, nil, &out, &out)
	if err != nil {
		return err
	}
	if st.Code != 0 {
		return fmt.Errorf("health check %v exited %d: %s", h.Test, st.Code, lastLine(out.String()))
	}
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

func (c *Controller) waitHealthy(ctx context.Context, vm string, h *AppliedHealth) error {
	var last error
	for i := 0; i <= h.Retries; i++ {
		if last = c.Check(ctx, vm, h); last == nil {
			return nil
		}
		if !c.Running(vm) {
			return fmt.Errorf("stopped while waiting for health: %w", last)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for health: %w (last: %v)", ctx.Err(), last)
		case <-time.After(h.Interval):
		}
	}
	return fmt.Errorf("unhealthy after %d checks: %w", h.Retries+1, last)
}

// Status is a unit's state on this host.
type Status struct {
	Unit, VM, Phase, IP, Health string
	BootMillis                  int64
}

// Status reports each unit of fleet name: phase from the event projection (and the VM folder),
// health from running its check now.
func (c *Controller) Status(ctx context.Context, name string) ([]Status, error) {
	a, err := c.Load(name)
	if err != nil {
		return nil, err
	}
	st, err := broker.ReadProjection(ctx, c.cfg.Client)
	if err != nil {
		return nil, err
	}
	var out []Status
	for _, unit := range a.order() {
		u := a.Units[unit]
		s := Status{Unit: unit, VM: u.Request.Name, Phase: "stopped"}
		if v, ok := st.VMs[u.Request.Name]; ok {
			s.Phase, s.IP, s.BootMillis = v.Phase, v.IP, v.BootMillis
		}
		running := c.Running(u.Request.Name)
		switch {
		case running && s.Phase != "starting":
			s.Phase = "running"
		case !running && (s.Phase == "ready" || s.Phase == "starting"):
			s.Phase = "stopped"
		}
		if s.Phase != "running" {
			s.IP = ""
		}
		if running && u.Health != nil {
			hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			h := *u.Health
			h.Timeout = 5 * time.Second
			if c.Check(hctx, u.Request.Name, &h) == nil {
				s.Health = "healthy"
			} else {
				s.Health = "unhealthy"
			}
			cancel()
		}
		out = append(out, s)
	}
	return out, nil
}

// launch asks this host's launcher to boot req and waits for vm.ready or vm.failed.
func (c *Controller) launch(ctx context.Context, req launcher.Request) (*broker.VMReady, error) {
	return launcher.Launch(ctx, c.cfg.Client, c.cfg.Client.Host(), req)
}

// stopVM asks this host's launcher to stop vm and waits until it has.
func (c *Controller) stopVM(ctx context.Context, vm string) error {
	_, err := launcher.Stop(ctx, c.cfg.Client, c.cfg.Client.Host(), vm, false)
	return err
}
