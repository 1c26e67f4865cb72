package initproc

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Modes of operation after boot (virtkit.mode=).
const (
	ModeEntrypoint = "entrypoint" // run the image's entrypoint, power off when it exits
	ModeAgent      = "agent"      // just serve until asked to shut down
	ModeSystemd    = "systemd"    // hand PID 1 to systemd, keep serving as a unit
)

// Share is a virtio-fs mount (virtkit.fs=TAG:/mount/point[:ro]).
type Share struct {
	Tag, Path string
	RO        bool
}

// Volume is a data disk mounted before the mode starts (virtkit.volume=/dev/vdX:/mount/point[:ro]).
type Volume struct {
	Dev, Path string
	RO        bool
}

// Net is the guest network configuration (virtkit.net=).
type Net struct {
	Mode    string       // dhcp, none or static
	Address netip.Prefix // static
	Gateway netip.Addr   // static, optional
}

// Config is the agent's boot configuration. KEYS.md in agent/ documents every key.
type Config struct {
	Mode      string        // virtkit.mode: entrypoint, agent, systemd (default: entrypoint when the image config exists, else agent)
	Hostname  string        // virtkit.hostname
	Overlay   string        // virtkit.overlay: a block device (writable layer, ext4), "tmpfs", or "" for a plain root
	OverlayFS string        // virtkit.overlay_fstype: filesystem of the overlay device (default ext4)
	FS        []Share       // virtkit.fs, repeatable or comma-separated
	Volumes   []Volume      // virtkit.volume: ext4 data disks, repeatable or comma-separated
	Command   []string      // virtkit.command: replaces the image's entrypoint + cmd (comma list, or b64:BASE64 of a JSON array)
	Env       []string      // virtkit.env: KEY=VALUE added to (or replacing in) the image's env; repeatable, or b64:BASE64 of a JSON array
	Net       Net           // virtkit.net: dhcp (default), none, static:IP/PREFIX[,GW]
	DNS       []netip.Addr  // virtkit.dns: comma-separated
	ExitCode  string        // virtkit.exitcode: where "virtkit: exit-code N" goes: console (default), a device path, or an endpoint URL
	SSHKeys   []string      // virtkit.ssh_key: authorized keys for root (quoted, or b64:BASE64); starts sshd
	Listen    string        // virtkit.listen: exec server endpoint (default vsock://any:1024)
	Relay     string        // virtkit.relay: network switch endpoint (default vsock://2:1025)
	Tap       string        // virtkit.tap: tap device name (default vk0)
	NIC       string        // virtkit.nic: kernel interface to configure instead of the relay (a VM on a tap)
	Image     string        // virtkit.image: image config file (default /.virtkit/image.json)
	Poweroff  string        // virtkit.poweroff: poweroff (default) or reboot (for machines without ACPI: kernel reboot=t, QEMU -no-reboot)
	Linger    time.Duration // virtkit.linger: keep serving this long after the entrypoint exited
	Allow     []string      // virtkit.allow: exec allow-list (absolute paths)
	Wrapper   []string      // virtkit.wrapper: exec wrapper argv, comma-separated
	Debug     bool          // virtkit.debug: verbose console logging
	Systemd   string        // virtkit.systemd: systemd binary (default /lib/systemd/systemd)
	Unknown   []string      // keys this agent does not know (logged, not fatal: a newer host may pass them)
}

func defaults() Config {
	return Config{
		OverlayFS: "ext4",
		Net:       Net{Mode: "dhcp"},
		ExitCode:  "console",
		Listen:    "vsock://any:1024",
		Relay:     "vsock://2:1025",
		Tap:       "vk0",
		Image:     "/.virtkit/image.json",
		Poweroff:  "poweroff",
		Systemd:   "/lib/systemd/systemd",
	}
}

// SplitCmdline splits a kernel command line into words the way the kernel does: whitespace
// separates, double quotes group (and are removed).
func SplitCmdline(s string) []string {
	var out []string
	var cur strings.Builder
	inQ, have := false, false
	for _, r := range s {
		switch {
		case r == '"':
			inQ = !inQ
			have = true
		case !inQ && (r == ' ' || r == '\t' || r == '\n' || r == '\r'):
			if have {
				out = append(out, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteRune(r)
			have = true
		}
	}
	if have {
		out = append(out, cur.String())
	}
	return out
}

// Load builds the configuration from, in increasing precedence: the config file's lines
// (KEY=VALUE, with or without the "virtkit." prefix, # comments), the kernel command line's
// virtkit.* words, and VIRTKIT_<KEY> environment variables (e.g. VIRTKIT_MODE).
func Load(file, cmdline string, env []string) (Config, error) {
	c := defaults()
	set := map[string]bool{}
	apply := func(src, k, v string) error {
		if err := c.set(k, v); err != nil {
			return fmt.Errorf("initproc: %s: %w", src, err)
		}
		set[k] = true
		return nil
	}
	for i, line := range strings.Split(file, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return c, fmt.Errorf("initproc: config file line %d: want KEY=VALUE, got %q", i+1, line)
		}
		k = strings.TrimPrefix(strings.TrimSpace(k), "virtkit.")
		if err := apply(fmt.Sprintf("config file line %d", i+1), k, unquote(strings.TrimSpace(v))); err != nil {
			return c, err
		}
	}
	fileSet := set
	set = map[string]bool{}
	for _, w := range SplitCmdline(cmdline) {
		k, v, _ := strings.Cut(w, "=")
		if !strings.HasPrefix(k, "virtkit.") {
			continue
		}
		k = strings.TrimPrefix(k, "virtkit.")
		if fileSet[k] && !set[k] {
			c.reset(k) // the command line replaces a list from the file rather than extending it
		}
		if err := apply("kernel command line", k, v); err != nil {
			return c, err
		}
	}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(k, "VIRTKIT_") || k == "VIRTKIT_AGENT" {
			continue
		}
		key := strings.ToLower(strings.TrimPrefix(k, "VIRTKIT_"))
		if _, known := keys[key]; !known {
			continue
		}
		c.reset(key)
		if err := apply("environment "+k, key, v); err != nil {
			return c, err
		}
	}
	return c, nil
}

var keys = map[string]struct{}{"mode": {}, "hostname": {}, "overlay": {}, "overlay_fstype": {}, "fs": {},
	"volume": {}, "command": {}, "env": {}, "net": {}, "dns": {}, "exitcode": {}, "ssh_key": {}, "listen": {}, "relay": {}, "tap": {}, "nic": {},
	"image": {}, "poweroff": {}, "linger": {}, "allow": {}, "wrapper": {}, "debug": {}, "systemd": {}}

func unquote(v string) string {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		return v[1 : len(v)-1]
	}
	return v
}

func (c *Config) reset(k string) {
	switch k {
	case "fs":
		c.FS = nil
	case "volume":
		c.Volumes = nil
	case "env":
		c.Env = nil
	case "dns":
		c.DNS = nil
	case "ssh_key":
		c.SSHKeys = nil
	case "allow":
		c.Allow = nil
	}
}

func (c *Config) set(k, v string) error {
	switch k {
	case "mode":
		switch v {
		case ModeEntrypoint, ModeAgent, ModeSystemd:
			c.Mode = v
		default:
			return fmt.Errorf("virtkit.mode=%q: want entrypoint, agent or systemd", v)
		}
	case "hostname":
		if len(v) > 64 || strings.ContainsAny(v, " /\x00") {
			return fmt.Errorf("virtkit.hostname=%q: not a host name", v)
		}
		c.Hostname = v
	case "overlay":
		if v != "" && v != "tmpfs" && !strings.HasPrefix(v, "/dev/") {
			return fmt.Errorf("virtkit.overlay=%q: want a /dev/ block device or tmpfs", v)
		}
		c.Overlay = v
	case "overlay_fstype":
		c.OverlayFS = v
	case "fs":
		for _, s := range strings.Split(v, ",") {
			if s == "" {
				continue
			}
			parts := strings.Split(s, ":")
			if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || !strings.HasPrefix(parts[1], "/") {
				return fmt.Errorf("virtkit.fs=%q: want TAG:/mount/point[:ro]", s)
			}
			sh := Share{Tag: parts[0], Path: parts[1]}
			if len(parts) == 3 {
				if parts[2] != "ro" && parts[2] != "rw" {
					return fmt.Errorf("virtkit.fs=%q: option %q, want ro or rw", s, parts[2])
				}
				sh.RO = parts[2] == "ro"
			}
			c.FS = append(c.FS, sh)
		}
	case "volume":
		for _, s := range strings.Split(v, ",") {
			if s == "" {
				continue
			}
			parts := strings.Split(s, ":")
			if len(parts) < 2 || len(parts) > 3 || !strings.HasPrefix(parts[0], "/dev/") || !strings.HasPrefix(parts[1], "/") || parts[1] == "/" {
				return fmt.Errorf("virtkit.volume=%q: want /dev/DISK:/mount/point[:ro]", s)
			}
			vol := Volume{Dev: parts[0], Path: parts[1]}
			if len(parts) == 3 {
				if parts[2] != "ro" && parts[2] != "rw" {
					return fmt.Errorf("virtkit.volume=%q: option %q, want ro or rw", s, parts[2])
				}
				vol.RO = parts[2] == "ro"
			}
			c.Volumes = append(c.Volumes, vol)
		}
	case "command":
		argv, err := stringList("command", v, true)
		if err != nil {
			return err
		}
		if len(argv) == 0 || argv[0] == "" {
			return fmt.Errorf("virtkit.command=%q: empty command", v)
		}
		c.Command = argv
	case "env":
		env, err := stringList("env", v, false)
		if err != nil {
			return err
		}
		for _, kv := range env {
			if k, _, ok := strings.Cut(kv, "="); !ok || k == "" || strings.ContainsRune(k, 0) {
				return fmt.Errorf("virtkit.env=%q: want KEY=VALUE", kv)
			}
		}
		c.Env = append(c.Env, env...)
	case "net":
		n, err := parseNet(v)
		if err != nil {
			return err
		}
		c.Net = n
	case "dns":
		for _, s := range strings.Split(v, ",") {
			if s == "" {
				continue
			}
			a, err := netip.ParseAddr(s)
			if err != nil {
				return fmt.Errorf("virtkit.dns=%q: %w", v, err)
			}
			c.DNS = append(c.DNS, a)
		}
	case "exitcode":
		c.ExitCode = v
	case "ssh_key":
		if rest, ok := strings.CutPrefix(v, "b64:"); ok {
			b, err := base64.StdEncoding.DecodeString(rest)
			if err != nil {
				if b, err = base64.RawURLEncoding.DecodeString(rest); err != nil {
					return fmt.Errorf("virtkit.ssh_key: bad base64: %w", err)
				}
			}
			v = string(b)
		}
		if v = strings.TrimSpace(v); v != "" {
			c.SSHKeys = append(c.SSHKeys, v)
		}
	case "listen":
		c.Listen = v
	case "relay":
		c.Relay = v
	case "tap":
		c.Tap = v
	case "nic":
		if v != "" && (len(v) > 15 || strings.ContainsAny(v, "/ \t")) {
			return fmt.Errorf("virtkit.nic=%q: not an interface name", v)
		}
		c.NIC = v
	case "image":
		c.Image = v
	case "poweroff":
		if v != "poweroff" && v != "reboot" {
			return fmt.Errorf("virtkit.poweroff=%q: want poweroff or reboot", v)
		}
		c.Poweroff = v
	case "linger":
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return fmt.Errorf("virtkit.linger=%q: want a duration like 5s", v)
		}
		c.Linger = d
	case "allow":
		for _, s := range strings.Split(v, ",") {
			if s != "" {
				c.Allow = append(c.Allow, s)
			}
		}
	case "wrapper":
		c.Wrapper = nil
		for _, s := range strings.Split(v, ",") {
			if s != "" {
				c.Wrapper = append(c.Wrapper, s)
			}
		}
	case "debug":
		c.Debug = v == "" || v == "1" || v == "true" || v == "yes"
	case "systemd":
		c.Systemd = v
	default:
		// Unknown keys are reported, not fatal: a newer host may pass keys an older agent lacks.
		c.Unknown = append(c.Unknown, k)
	}
	return nil
}

// stringList reads b64:BASE64 (standard or URL alphabet) of a JSON array of strings, or else the
// plain value: split at commas when commas is set, one item otherwise.
func stringList(key, v string, commas bool) ([]string, error) {
	rest, ok := strings.CutPrefix(v, "b64:")
	if !ok {
		if !commas {
			return []string{v}, nil
		}
		var out []string
		for _, s := range strings.Split(v, ",") {
			if s != "" {
				out = append(out, s)
			}
		}
		return out, nil
	}
	b, err := base64.StdEncoding.DecodeString(rest)
	if err != nil {
		if b, err = base64.RawURLEncoding.DecodeString(rest); err != nil {
			return nil, fmt.Errorf("virtkit.%s: bad base64: %w", key, err)
		}
	}
	var out []string
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("virtkit.%s: want b64: of a JSON array of strings: %w", key, err)
	}
	return out, nil
}

func parseNet(v string) (Net, error) {
	switch {
	case v == "dhcp" || v == "none":
		return Net{Mode: v}, nil
	case strings.HasPrefix(v, "static:"):
		spec := strings.TrimPrefix(v, "static:")
		ip, gw, hasGW := strings.Cut(spec, ",")
		p, err := netip.ParsePrefix(ip)
		if err != nil {
			return Net{}, fmt.Errorf("virtkit.net=%q: address: %w", v, err)
		}
		n := Net{Mode: "static", Address: p}
		if hasGW {
			a, err := netip.ParseAddr(gw)
			if err != nil {
				return Net{}, fmt.Errorf("virtkit.net=%q: gateway: %w", v, err)
			}
			n.Gateway = a
		}
		return n, nil
	}
	return Net{}, fmt.Errorf("virtkit.net=%q: want dhcp, none or static:IP/PREFIX[,GW]", v)
}
