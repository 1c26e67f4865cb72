// Package fleet runs a dev fleet: a set of microVM units (a builder plus services such as redis or
// mysql) on one userspace LAN, described by a compose-like YAML file (virtkit.yaml). This file is
// the fleet file's model, parser and validator; errors carry the file's line numbers.
//
// The JSON schema of the file is docs/fleet.schema.json; TestSchemaMatchesModel keeps them together.
package fleet

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
)

// File is a parsed, validated fleet file.
type File struct {
	// Name of the fleet (default: the folder holding the file). Its LAN is fleet-<name>; its VMs
	// are <name>-<unit> on the host and <unit> on the LAN (units resolve as <unit>.lan), so two
	// fleets may each have a unit of the same name.
	Name string `yaml:"name" json:"name,omitempty"`
	// Subnet of the fleet LAN, an IPv4 network of /30 or larger (default: the daemon's net.subnet,
	// 10.77.0.0/24). Subnets given here may not overlap those of other fleets on the host.
	Subnet string `yaml:"subnet" json:"subnet,omitempty"`
	// Units by name; each resolves as <unit>.lan on the fleet LAN.
	Units map[string]*Unit `yaml:"units" json:"units"`

	// Path is the file's path (as given to Parse); Dir its folder: relative share paths start there.
	Path string `yaml:"-" json:"-"`
	Dir  string `yaml:"-" json:"-"`
}

// Unit is one microVM of the fleet.
type Unit struct {
	Image   string            `yaml:"image" json:"image"`
	CPUs    int               `yaml:"cpus" json:"cpus,omitempty"`
	Memory  Size              `yaml:"memory" json:"memory,omitempty"`
	Env     map[string]string `yaml:"env" json:"env,omitempty"`
	Command []string          `yaml:"command" json:"command,omitempty"`
	// Mode: "entrypoint" (run the image's command; default for services) or "agent" (an interactive
	// machine such as the builder: just the agent).
	Mode      string      `yaml:"mode" json:"mode,omitempty"`
	Shares    []Share     `yaml:"shares" json:"shares,omitempty"`
	Volumes   []Volume    `yaml:"volumes" json:"volumes,omitempty"`
	Ports     []Port      `yaml:"ports" json:"ports,omitempty"`
	DependsOn []string    `yaml:"depends_on" json:"depends_on,omitempty"`
	Health    *Health     `yaml:"healthcheck" json:"healthcheck,omitempty"`
	Autostart *bool       `yaml:"autostart" json:"autostart,omitempty"`
	SSHKeys   []string    `yaml:"ssh_keys" json:"ssh_keys,omitempty"`
	Virtctl   VirtctlList `yaml:"virtctl" json:"virtctl,omitempty"`
}

// Share is a host folder mounted in the unit over virtio-fs.
type Share struct {
	Host     string `yaml:"host" json:"host"`
	Guest    string `yaml:"guest" json:"guest"`
	ReadOnly bool   `yaml:"readonly" json:"readonly,omitempty"`
	// UIDMap / GIDMap map guest ids to host ids ("GUEST:HOST:COUNT"), e.g. "0:1000:1".
	UIDMap string `yaml:"uid_map" json:"uid_map,omitempty"`
	GIDMap string `yaml:"gid_map" json:"gid_map,omitempty"`
}

// Volume is a persistent ext4 data disk, kept across restarts and `fleet down`.
type Volume struct {
	Name string `yaml:"name" json:"name"`
	Path string `yaml:"path" json:"path"`
	Size Size   `yaml:"size" json:"size"`
}

// Health is an exec health check.
type Health struct {
	Test     []string `yaml:"test" json:"test"`
	Interval Duration `yaml:"interval" json:"interval,omitempty"`
	Timeout  Duration `yaml:"timeout" json:"timeout,omitempty"`
	Retries  int      `yaml:"retries" json:"retries,omitempty"`
}

// Port forwards a host TCP port to the unit: "HOSTPORT:GUESTPORT" or "IP:HOSTPORT:GUESTPORT".
type Port struct {
	HostIP    string `json:"host_ip"`
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
	err       error
}

// VirtctlList names the units a unit may start and stop with virtctl; `true` means all, `false` or
// absence none.
type VirtctlList struct {
	All   bool
	Units []string
	err   error
}

// Size is a byte count written as 512M, 2G, 1GiB, 1048576. A value that does not parse is kept
// with its error so that validation can report it with its line.
type Size struct {
	Bytes int64
	err   error
}

// Duration is a Go duration string: 500ms, 5s, 1m.
type Duration struct {
	D   time.Duration
	err error
}

var (
	posRE      = regexp.MustCompile(`(?s)^\s*\[(\d+):(\d+)\]\s*(.*?)(\n|$)`)
	unitNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,30}$`)
	sizeRE     = regexp.MustCompile(`^([0-9]+)\s*([KMGT]?)(i?B)?$`)
)

// ParseSize reads 512M, 2G, 1GiB or a plain byte count.
func ParseSize(s string) (int64, error) {
	m := sizeRE.FindStringSubmatch(strings.ToUpper(strings.TrimSpace(s)))
	if m == nil {
		return 0, fmt.Errorf("size %q: want a number with an optional K, M, G or T suffix", s)
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	shift := map[string]uint{"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m[2]]
	if n > (1<<62)>>shift {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return n << shift, nil
}

func scalar(b []byte) string {
	var v any
	if err := yaml.Unmarshal(b, &v); err != nil {
		return strings.TrimSpace(string(b))
	}
	return fmt.Sprint(v)
}

func (s *Size) UnmarshalYAML(b []byte) error {
	s.Bytes, s.err = ParseSize(scalar(b))
	return nil
}

// MiB is the size in MiB.
func (s Size) MiB() int { return int(s.Bytes >> 20) }

func (d *Duration) UnmarshalYAML(b []byte) error {
	v := scalar(b)
	x, err := time.ParseDuration(v)
	if err != nil || x < 0 {
		d.err = fmt.Errorf("duration %q: want e.g. 500ms, 5s, 1m", v)
		return nil
	}
	d.D = x
	return nil
}

func (p *Port) UnmarshalYAML(b []byte) error {
	v := scalar(b)
	parts := strings.Split(v, ":")
	if len(parts) == 2 {
		parts = append([]string{"127.0.0.1"}, parts...)
	}
	if len(parts) != 3 {
		p.err = fmt.Errorf("port %q: want HOSTPORT:GUESTPORT or IP:HOSTPORT:GUESTPORT", v)
		return nil
	}
	hp, err1 := strconv.Atoi(parts[1])
	gp, err2 := strconv.Atoi(parts[2])
	if err1 != nil || err2 != nil || hp < 1 || hp > 65535 || gp < 1 || gp > 65535 {
		p.err = fmt.Errorf("port %q: ports must be 1-65535", v)
		return nil
	}
	*p = Port{HostIP: parts[0], HostPort: hp, GuestPort: gp}
	return nil
}

func (v *VirtctlList) UnmarshalYAML(b []byte) error {
	var all bool
	if err := yaml.Unmarshal(b, &all); err == nil {
		*v = VirtctlList{All: all}
		return nil
	}
	var units []string
	if err := yaml.Unmarshal(b, &units); err != nil {
		v.err = errors.New("virtctl: want true, false or a list of unit names")
		return nil
	}
	*v = VirtctlList{Units: units}
	return nil
}

// Allows reports whether a unit with this list may control target.
func (v VirtctlList) Allows(target string) bool {
	if v.All {
		return true
	}
	for _, u := range v.Units {
		if u == target {
			return true
		}
	}
	return false
}

// Enabled reports whether the unit may use virtctl at all.
func (v VirtctlList) Enabled() bool { return v.All || len(v.Units) > 0 }

// Load reads and validates a fleet file.
func Load(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("fleet: %w", err)
	}
	abs, _ := filepath.Abs(path)
	return Parse(b, abs)
}

// Parse parses and validates fleet YAML; path names the file in errors and anchors relative paths.
func Parse(b []byte, path string) (_ *File, err error) {
	defer func() {
		// The YAML decoder panics on some malformed input (e.g. a tag on an empty sequence value,
		// found by FuzzParse): report it as a bad file, not a crash.
		if r := recover(); r != nil {
			err = fmt.Errorf("fleet %s: malformed YAML (the decoder failed: %v)", path, r)
		}
	}()
	f := &File{}
	if err := yaml.UnmarshalWithOptions(b, f, yaml.DisallowUnknownField(), yaml.Strict()); err != nil {
		msg := yaml.FormatError(err, false, false)
		// goccy says "[LINE:COL] message"; say it the compiler way: file:LINE:COL: message.
		if m := posRE.FindStringSubmatch(msg); m != nil {
			return nil, fmt.Errorf("fleet %s:%s:%s: %s", path, m[1], m[2], strings.TrimSpace(m[3]))
		}
		return nil, fmt.Errorf("fleet %s: %s", path, msg)
	}
	f.Path, f.Dir = path, filepath.Dir(path)
	if f.Name == "" {
		f.Name = sanitize(filepath.Base(f.Dir))
	}
	ast, _ := parser.ParseBytes(b, 0)
	return f, f.validate(func(yamlPath string) string {
		return fmt.Sprintf("fleet %s:%d", path, line(ast, yamlPath))
	})
}

// line finds the line of a YAML path, or the nearest existing parent's line.
func line(file *ast.File, yamlPath string) int {
	if file == nil {
		return 0
	}
	for yamlPath != "" && yamlPath != "$" {
		if p, err := yaml.PathString(yamlPath); err == nil {
			if n, err := p.FilterFile(file); err == nil && n != nil {
				return n.GetToken().Position.Line
			}
		}
		i := strings.LastIndexAny(yamlPath, ".[")
		if i < 0 {
			break
		}
		yamlPath = yamlPath[:i]
	}
	return 1
}

func (f *File) validate(at func(string) string) error {
	if len(f.Units) == 0 {
		return fmt.Errorf("%s: no units", at("$.units"))
	}
	// Fleet and unit names are at most 31 characters, so VM names (<fleet>-<unit>) stay DNS labels.
	if !unitNameRE.MatchString(f.Name) {
		return fmt.Errorf("%s: fleet name %q: want 1-31 of a-z, 0-9 and -", at("$.name"), f.Name)
	}
	if f.Subnet != "" {
		p, err := netip.ParsePrefix(f.Subnet)
		switch {
		case err != nil:
			return fmt.Errorf("%s: subnet %q: want an IPv4 network such as 10.78.0.0/24", at("$.subnet"), f.Subnet)
		case !p.Addr().Is4() || p.Bits() > 30 || p.Bits() < 8:
			return fmt.Errorf("%s: subnet %s: want an IPv4 network between /8 and /30", at("$.subnet"), f.Subnet)
		case p != p.Masked():
			return fmt.Errorf("%s: subnet %s has host bits set: did you mean %s?", at("$.subnet"), f.Subnet, p.Masked())
		}
	}
	names := f.UnitNames()
	for _, name := range names {
		u := f.Units[name]
		p := "$.units." + name
		if u == nil {
			return fmt.Errorf("%s: unit %q is empty", at(p), name)
		}
		if !unitNameRE.MatchString(name) {
			return fmt.Errorf("%s: unit name %q: want 1-31 of a-z, 0-9 and -", at(p), name)
		}
		if u.Image == "" {
			return fmt.Errorf("%s: unit %q has no image", at(p), name)
		}
		if u.CPUs < 0 || u.CPUs > 64 {
			return fmt.Errorf("%s: cpus %d: want 1-64", at(p+".cpus"), u.CPUs)
		}
		if u.Memory.err != nil {
			return fmt.Errorf("%s: memory: %w", at(p+".memory"), u.Memory.err)
		}
		if u.Memory.Bytes != 0 && (u.Memory.Bytes < 64<<20 || u.Memory.Bytes > 1<<40) {
			return fmt.Errorf("%s: memory %d bytes: want between 64M and 1T", at(p+".memory"), u.Memory.Bytes)
		}
		for i, port := range u.Ports {
			if port.err != nil {
				return fmt.Errorf("%s: %w", at(fmt.Sprintf("%s.ports[%d]", p, i)), port.err)
			}
		}
		if u.Virtctl.err != nil {
			return fmt.Errorf("%s: %w", at(p+".virtctl"), u.Virtctl.err)
		}
		if h := u.Health; h != nil {
			for k, d := range map[string]Duration{"interval": h.Interval, "timeout": h.Timeout} {
				if d.err != nil {
					return fmt.Errorf("%s: %s: %w", at(p+".healthcheck."+k), k, d.err)
				}
			}
		}
		switch u.Mode {
		case "", "agent", "entrypoint":
		default:
			return fmt.Errorf("%s: mode %q: want agent or entrypoint", at(p+".mode"), u.Mode)
		}
		if u.Mode == "agent" && len(u.Command) > 0 {
			return fmt.Errorf("%s: a command runs only in entrypoint mode (an agent-mode unit runs no command of its own)", at(p+".command"))
		}
		if len(u.Command) > 0 && u.Command[0] == "" {
			return fmt.Errorf("%s: command: the program is empty", at(p+".command"))
		}
		for k := range u.Env {
			if k == "" || strings.ContainsAny(k, "=\x00") {
				return fmt.Errorf("%s: env name %q: want a name without '='", at(p+".env"), k)
			}
		}
		for i, s := range u.Shares {
			sp := fmt.Sprintf("%s.shares[%d]", p, i)
			if s.Host == "" || !filepath.IsAbs(s.Guest) {
				return fmt.Errorf("%s: share needs host and an absolute guest path", at(sp))
			}
			for _, m := range []string{s.UIDMap, s.GIDMap} {
				if m != "" && !regexp.MustCompile(`^\d+:\d+:\d+$`).MatchString(m) {
					return fmt.Errorf("%s: id map %q: want GUEST:HOST:COUNT", at(sp), m)
				}
			}
		}
		vols := map[string]bool{}
		for i, v := range u.Volumes {
			vp := fmt.Sprintf("%s.volumes[%d]", p, i)
			if !unitNameRE.MatchString(v.Name) || vols[v.Name] {
				return fmt.Errorf("%s: volume name %q: want a unique name of a-z, 0-9 and -", at(vp), v.Name)
			}
			vols[v.Name] = true
			if !filepath.IsAbs(v.Path) {
				return fmt.Errorf("%s: volume path %q must be absolute", at(vp+".path"), v.Path)
			}
			if v.Size.err != nil {
				return fmt.Errorf("%s: volume size: %w", at(vp+".size"), v.Size.err)
			}
			if v.Size.Bytes < 16<<20 || v.Size.Bytes > 16<<40 {
				return fmt.Errorf("%s: volume size %d bytes: want between 16M and 16T", at(vp+".size"), v.Size.Bytes)
			}
		}
		for i, d := range u.DependsOn {
			if _, ok := f.Units[d]; !ok || d == name {
				return fmt.Errorf("%s: depends_on %q: no such other unit", at(fmt.Sprintf("%s.depends_on[%d]", p, i)), d)
			}
		}
		if u.Health != nil && len(u.Health.Test) == 0 {
			return fmt.Errorf("%s: healthcheck needs a test command", at(p+".healthcheck"))
		}
		for i, t := range u.Virtctl.Units {
			if _, ok := f.Units[t]; !ok {
				return fmt.Errorf("%s: virtctl names unknown unit %q", at(fmt.Sprintf("%s.virtctl[%d]", p, i)), t)
			}
		}
	}
	if cyc := f.cycle(); cyc != nil {
		return fmt.Errorf("%s: depends_on cycle: %s", at("$.units."+cyc[0]+".depends_on"), strings.Join(cyc, " -> "))
	}
	return nil
}

// UnitNames returns the unit names sorted.
func (f *File) UnitNames() []string {
	names := make([]string, 0, len(f.Units))
	for n := range f.Units {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// cycle returns a dependency cycle, if any, as a path that starts and ends at the same unit.
func (f *File) cycle() []string {
	const (
		white = iota
		grey
		black
	)
	color := map[string]int{}
	var stack []string
	var found []string
	var visit func(n string) bool
	visit = func(n string) bool {
		color[n] = grey
		stack = append(stack, n)
		for _, d := range f.Units[n].DependsOn {
			if color[d] == grey {
				for i, s := range stack {
					if s == d {
						found = append(append([]string{}, stack[i:]...), d)
					}
				}
				return true
			}
			if color[d] == white && visit(d) {
				return true
			}
		}
		stack = stack[:len(stack)-1]
		color[n] = black
		return false
	}
	for _, n := range f.UnitNames() {
		if color[n] == white && visit(n) {
			return found
		}
	}
	return nil
}

// Order returns the units in dependency order (dependencies first), ties by name.
func (f *File) Order() []string {
	var out []string
	done := map[string]bool{}
	var add func(string)
	add = func(n string) {
		if done[n] {
			return
		}
		done[n] = true
		deps := append([]string{}, f.Units[n].DependsOn...)
		sort.Strings(deps)
		for _, d := range deps {
			add(d)
		}
		out = append(out, n)
	}
	for _, n := range f.UnitNames() {
		add(n)
	}
	return out
}

func sanitize(s string) string {
	var b bytes.Buffer
	for _, r := range strings.ToLower(s) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case b.Len() > 0 && !bytes.HasSuffix(b.Bytes(), []byte("-")):
			b.WriteByte('-')
		}
	}
	out := strings.Trim(b.String(), "-")
	if len(out) > 31 {
		out = out[:31]
	}
	if out == "" {
		out = "fleet"
	}
	return out
}
