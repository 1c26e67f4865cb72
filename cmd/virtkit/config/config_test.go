package config_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/virtkit/virtkit/cmd/virtkit/config"
)

// isolate points every lookup at a temp dir so the machine's own config and environment do not
// leak into the test.
func isolate(t *testing.T) string {
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "xdg-config"))
	t.Setenv("XDG_STATE_HOME", filepath.Join(dir, "xdg-state"))
	t.Setenv("XDG_CACHE_HOME", filepath.Join(dir, "xdg-cache"))
	t.Setenv("HOME", dir)
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "VIRTKIT_") {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
	return dir
}

func write(t *testing.T, dir, body string) string {
	p := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaults(t *testing.T) {
	dir := isolate(t)
	c, err := config.Load("")
	if err != nil {
		t.Fatalf("no config file at all: %v", err)
	}
	if c.StateDir != filepath.Join(dir, "xdg-state", "virtkit") || c.CacheDir != filepath.Join(dir, "xdg-cache", "virtkit") {
		t.Errorf("dirs %q %q", c.StateDir, c.CacheDir)
	}
	if c.LogLevel != "info" || c.NATS.URL != "" || c.VM.VMM != "auto" || c.VM.Capacity != 4 || c.Net.Mode != "switch" || c.Host == "" {
		t.Errorf("defaults %+v", c)
	}
}

func TestFileAndEnvironment(t *testing.T) {
	dir := isolate(t)
	creds := filepath.Join(dir, "user.creds")
	os.WriteFile(creds, []byte("x"), 0o600)
	p := write(t, dir, `
state_dir = "/srv/vk"
[nats]
url = "tls://nats1:4222,tls://nats2:4222"
creds = "`+creds+`"
[vm]
capacity = 12
`)
	t.Setenv("VIRTKIT_VM_CAPACITY", "3")
	t.Setenv("VIRTKIT_CI_ALLOWED_REGISTRIES", "registry.example.com, docker.io ,")
	c, err := config.Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.StateDir != "/srv/vk" || c.NATS.Creds != creds || !strings.HasPrefix(c.NATS.URL, "tls://nats1") {
		t.Errorf("from file: %+v", c)
	}
	if c.VM.Capacity != 3 {
		t.Errorf("VIRTKIT_VM_CAPACITY did not win over the file: %d", c.VM.Capacity)
	}
	if got := strings.Join(c.CI.AllowedRegistries, "|"); got != "registry.example.com|docker.io" {
		t.Errorf("allowed registries %q", got)
	}
	// VIRTKIT_CONFIG names the file.
	t.Setenv("VIRTKIT_CONFIG", p)
	if c, err := config.Load(""); err != nil || c.StateDir != "/srv/vk" {
		t.Errorf("VIRTKIT_CONFIG: %v %+v", err, c)
	}
}

// Every bad configuration is an error that names the file or variable, the key and the problem.
func TestBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		body string
		env  map[string]string
		want []string
	}{
		{"unknown top-level key", `stat_dir = "/x"`, nil, []string{"config.toml", "unknown key stat_dir"}},
		{"unknown nested key", "[nats]\nurll = \"nats://a:4222\"\n", nil, []string{"unknown key nats.urll"}},
		{"several unknown keys", "colour = 1\n[vm]\ncpu = 2\n", nil, []string{"unknown key", "colour", "vm.cpu"}},
		{"syntax", "[nats\nurl = 1", nil, []string{"config.toml", "line"}},
		{"wrong type", "[vm]\ncapacity = \"four\"\n", nil, []string{"config.toml", "capacity"}},
		{"url scheme", "[nats]\nurl = \"http://nats:4222\"\n", nil, []string{"nats.url", `scheme "http"`}},
		{"url without scheme", "[nats]\nurl = \"nats-host\"\n", nil, []string{"nats.url", "nats://host:4222"}},
		{"url from env", "", map[string]string{"VIRTKIT_NATS_URL": "ftp://x"}, []string{"nats.url", `"ftp"`}},
		{"missing creds", "[nats]\nurl = \"nats://a:4222\"\ncreds = \"/nonexistent/user.creds\"\n", nil, []string{"nats.creds", "/nonexistent/user.creds", "no such file"}},
		{"creds under a file", "[nats]\ncreds = \"/etc/hostname/x\"\n", nil, []string{"nats.creds", "not a directory"}},
		{"missing tls key", "[nats]\ntls_key = \"/nonexistent/k.pem\"\n", nil, []string{"nats.tls_key", "no such file"}},
		{"log level", `log_level = "loud"`, nil, []string{"log_level", "loud"}},
		{"vmm", "[vm]\nvmm = \"firecracker\"\n", nil, []string{"vm.vmm", "firecracker"}},
		{"net mode", "[net]\nmode = \"bridge\"\n", nil, []string{"net.mode", "bridge"}},
		{"pool without taps", "[net]\nmode = \"pool\"\n", nil, []string{"net.taps", "deploy/tap-pool.sh"}},
		{"env number", "", map[string]string{"VIRTKIT_VM_MEMORY_MIB": "lots"}, []string{"VIRTKIT_VM_MEMORY_MIB", "not a whole number"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := isolate(t)
			p := write(t, dir, tc.body)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := config.Load(p)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestExplicitMissingFile(t *testing.T) {
	dir := isolate(t)
	missing := filepath.Join(dir, "nope.toml")
	if _, err := config.Load(missing); err == nil || !strings.Contains(err.Error(), "nope.toml") {
		t.Errorf("explicit missing file: %v", err)
	}
	t.Setenv("VIRTKIT_CONFIG", missing)
	if _, err := config.Load(""); err == nil {
		t.Error("missing file named by VIRTKIT_CONFIG accepted")
	}
}
