// Package config loads virtkit's host configuration: a TOML file plus VIRTKIT_* environment
// overrides. The zero Config is usable: every field has a documented default that Load fills in.
//
// Lookup order for the file: $VIRTKIT_CONFIG, else $XDG_CONFIG_HOME/virtkit/config.toml (or
// ~/.config/virtkit/config.toml), else /etc/virtkit/config.toml. A missing file is not an error unless
// it was named by $VIRTKIT_CONFIG. Unknown keys are errors, so a typo never silently does nothing.
//
// Environment overrides use the TOML path in upper case joined by '_': VIRTKIT_STATE_DIR,
// VIRTKIT_NATS_URL, VIRTKIT_VM_MEMORY_MIB, … They win over the file.
package config

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// Config is the whole host configuration.
type Config struct {
	// StateDir holds the broker store, VM folders, the image store and credentials.
	// Default: $XDG_STATE_HOME/virtkit, else ~/.local/state/virtkit.
	StateDir string `toml:"state_dir"`
	// CacheDir holds rebuildable data: layer cache, kernels. Default: $XDG_CACHE_HOME/virtkit.
	CacheDir string `toml:"cache_dir"`
	// LogLevel is one of trace, debug, info, warn, error. Default info.
	LogLevel string `toml:"log_level"`
	// Host names this machine in the event log and the CI pool. Default: os.Hostname().
	Host string `toml:"host"`

	NATS NATS `toml:"nats"`
	VM   VM   `toml:"vm"`
	CI   CI   `toml:"ci"`
	Net  Net  `toml:"net"`
}

// NATS says where the event backbone lives. An empty URL means the embedded server.
type NATS struct {
	URL     string `toml:"url"`
	Creds   string `toml:"creds"`
	TLSCA   string `toml:"tls_ca"`
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
	// Port of the embedded server on 127.0.0.1; 0 picks a free one (written to the state dir).
	Port int `toml:"port"`
}

// VM holds defaults and limits for launched VMs.
type VM struct {
	// VMM is auto, cloud-hypervisor or qemu.
	VMM string `toml:"vmm"`
	// Kernel is the guest vmlinux; default the one ./build-kernel.sh produced.
	Kernel    string `toml:"kernel"`
	CPUs      int    `toml:"cpus"`
	MemoryMiB int    `toml:"memory_mib"`
	// MaxCPUs and MaxMemoryMiB cap what a request may ask for.
	MaxCPUs      int `toml:"max_cpus"`
	MaxMemoryMiB int `toml:"max_memory_mib"`
	// Capacity is how many VMs this host runs at once (pooled CI slots).
	Capacity int `toml:"capacity"`
}

// CI configures the GitLab custom executor.
type CI struct {
	// AllowedRegistries restricts job images; empty allows none but local sources.
	AllowedRegistries []string `toml:"allowed_registries"`
	DefaultImage      string   `toml:"default_image"`
	JobTimeoutSec     int      `toml:"job_timeout_sec"`
}

// Net configures guest networking.
type Net struct {
	// Mode is "switch" (userspace, default) or "pool": CI job VMs each lease one of Taps, taps
	// the operator made on their bridge (deploy/tap-pool.sh), and take DHCP from that network.
	Mode   string   `toml:"mode"`
	Subnet string   `toml:"subnet"`
	Taps   []string `toml:"taps"`
	// AllowHostLoopback lets guests reach the host's loopback through the gateway address.
	AllowHostLoopback bool `toml:"allow_host_loopback"`
	// Allow and Deny are CIDRs guests may or may not reach (secure defaults deny loopback,
	// link-local/metadata and the broker).
	Allow []string `toml:"allow"`
	Deny  []string `toml:"deny"`
}

// Path returns the config file to read and whether it was named explicitly.
func Path() (string, bool) {
	if p := os.Getenv("VIRTKIT_CONFIG"); p != "" {
		return p, true
	}
	if x := os.Getenv("XDG_CONFIG_HOME"); x != "" {
		if p := filepath.Join(x, "virtkit", "config.toml"); exists(p) {
			return p, false
		}
	} else if h, err := os.UserHomeDir(); err == nil {
		if p := filepath.Join(h, ".config", "virtkit", "config.toml"); exists(p) {
			return p, false
		}
	}
	return "/etc/virtkit/config.toml", false
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// Load reads the config file found by Path (path overrides it when not empty), applies the
// environment and fills in defaults. Errors name the file, the key and the problem.
func Load(path string) (*Config, error) {
	explicit := path != ""
	if !explicit {
		path, explicit = Path()
	}
	c := &Config{}
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		md, err := toml.Decode(string(data), c)
		if err != nil {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
		if und := md.Undecoded(); len(und) > 0 {
			keys := make([]string, len(und))
			for i, k := range und {
				keys[i] = k.String()
			}
			return nil, fmt.Errorf("config %s: unknown key %s", path, strings.Join(keys, ", "))
		}
	case errors.Is(err, os.ErrNotExist) && !explicit:
	default:
		return nil, fmt.Errorf("config: %w", err)
	}
	if err := applyEnv(reflect.ValueOf(c).Elem(), "VIRTKIT"); err != nil {
		return nil, err
	}
	if err := c.fill(); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

func applyEnv(v reflect.Value, prefix string) error {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name := prefix + "_" + strings.ToUpper(f.Tag.Get("toml"))
		fv := v.Field(i)
		if f.Type.Kind() == reflect.Struct {
			if err := applyEnv(fv, name); err != nil {
				return err
			}
			continue
		}
		s, ok := os.LookupEnv(name)
		if !ok || name == "VIRTKIT_CONFIG" {
			continue
		}
		switch f.Type.Kind() {
		case reflect.String:
			fv.SetString(s)
		case reflect.Bool:
			b, err := strconv.ParseBool(s)
			if err != nil {
				return fmt.Errorf("config: %s=%q: want true or false", name, s)
			}
			fv.SetBool(b)
		case reflect.Int:
			n, err := strconv.Atoi(s)
			if err != nil {
				return fmt.Errorf("config: %s=%q: not a whole number", name, s)
			}
			fv.SetInt(int64(n))
		case reflect.Slice:
			var parts []string
			for _, p := range strings.Split(s, ",") {
				if p = strings.TrimSpace(p); p != "" {
					parts = append(parts, p)
				}
			}
			fv.Set(reflect.ValueOf(parts))
		}
	}
	return nil
}

func (c *Config) fill() error {
	if c.StateDir == "" {
		c.StateDir = xdg("XDG_STATE_HOME", ".local/state")
	}
	if c.CacheDir == "" {
		c.CacheDir = xdg("XDG_CACHE_HOME", ".cache")
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	switch c.LogLevel {
	case "trace", "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log_level %q: want trace, debug, info, warn or error", c.LogLevel)
	}
	if c.Host == "" {
		h, _ := os.Hostname()
		c.Host = h
	}
	if c.NATS.URL != "" {
		u, err := url.Parse(c.NATS.URL)
		if err != nil || u.Host == "" {
			return fmt.Errorf("nats.url %q: not a URL like nats://host:4222", c.NATS.URL)
		}
		switch u.Scheme {
		case "nats", "tls", "ws", "wss":
		default:
			return fmt.Errorf("nats.url %q: scheme %q, want nats, tls, ws or wss", c.NATS.URL, u.Scheme)
		}
	}
	for _, f := range []struct{ key, path string }{{"nats.creds", c.NATS.Creds}, {"nats.tls_ca", c.NATS.TLSCA}, {"nats.tls_cert", c.NATS.TLSCert}, {"nats.tls_key", c.NATS.TLSKey}} {
		if f.path == "" {
			continue
		}
		fh, err := os.Open(f.path)
		if err != nil {
			return fmt.Errorf("%s: %w", f.key, err)
		}
		fi, err := fh.Stat()
		fh.Close()
		if err == nil && fi.IsDir() {
			return fmt.Errorf("%s: %s is a folder, not a file", f.key, f.path)
		}
	}
	switch c.VM.VMM {
	case "":
		c.VM.VMM = "auto"
	case "auto", "cloud-hypervisor", "qemu":
	default:
		return fmt.Errorf("vm.vmm %q: want auto, cloud-hypervisor or qemu", c.VM.VMM)
	}
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	def(&c.VM.CPUs, 1)
	def(&c.VM.MemoryMiB, 512)
	def(&c.VM.MaxCPUs, 8)
	def(&c.VM.MaxMemoryMiB, 16384)
	def(&c.VM.Capacity, 4)
	def(&c.CI.JobTimeoutSec, 3600)
	if c.Net.Mode == "" {
		c.Net.Mode = "switch"
	}
	if c.Net.Mode != "switch" && c.Net.Mode != "pool" {
		return fmt.Errorf("net.mode %q: want switch or pool", c.Net.Mode)
	}
	if c.Net.Mode == "pool" && len(c.Net.Taps) == 0 {
		return errors.New(`net.mode = "pool" needs net.taps: the pre-created taps (see deploy/tap-pool.sh)`)
	}
	if c.Net.Subnet == "" {
		c.Net.Subnet = "10.77.0.0/24"
	}
	return nil
}

func xdg(env, fallback string) string {
	if x := os.Getenv(env); x != "" {
		return filepath.Join(x, "virtkit")
	}
	h, err := os.UserHomeDir()
	if err != nil {
		h = os.TempDir()
	}
	return filepath.Join(h, fallback, "virtkit")
}
