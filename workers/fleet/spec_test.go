package fleet

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const good = `name: demo
subnet: 10.78.0.0/24
units:
  builder:
    image: tar:./debian.tar
    cpus: 2
    memory: 1G
    mode: agent
    shares:
      - host: .
        guest: /src
        uid_map: "0:1000:1"
    virtctl: [redis]
  redis:
    image: oci:./redis
    memory: 256M
    volumes:
      - name: data
        path: /var/lib/redis
        size: 64M
    ports: ["6379:6379"]
    healthcheck:
      test: [redis-cli, ping]
      interval: 500ms
      retries: 20
    autostart: true
  web:
    image: oci:./web
    depends_on: [redis]
`

func TestParseGood(t *testing.T) {
	f, err := Parse([]byte(good), "/p/virtkit.yaml")
	if err != nil {
		t.Fatal(err)
	}
	r := f.Units["redis"]
	if r.Memory.MiB() != 256 || r.Volumes[0].Size.Bytes != 64<<20 || r.Ports[0] != (Port{HostIP: "127.0.0.1", HostPort: 6379, GuestPort: 6379}) {
		t.Errorf("redis parsed as %+v", r)
	}
	if !f.Units["builder"].Virtctl.Allows("redis") || f.Units["builder"].Virtctl.Allows("web") || f.Units["redis"].Virtctl.Enabled() {
		t.Errorf("virtctl lists wrong")
	}
	if d := cmp.Diff([]string{"builder", "redis", "web"}, f.Order()); d != "" {
		t.Errorf("order: %s", d)
	}
	if f.Dir != "/p" || f.Subnet != "10.78.0.0/24" {
		t.Errorf("dir %q", f.Dir)
	}
}

func TestParseBad(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"unknown key", "units:\n  a:\n    image: x\n    memroy: 1G\n", `virtkit.yaml:4:5: unknown field "memroy"`},
		{"unknown key msg", "units:\n  a:\n    image: x\n    memroy: 1G\n", `memroy`},
		{"cycle", "units:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: x\n    depends_on: [a]\n", "cycle: a -> b -> a"},
		{"cycle line", "units:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: x\n    depends_on: [a]\n", "virtkit.yaml:4"},
		{"duplicate", "units:\n  a:\n    image: x\n  a:\n    image: y\n", `virtkit.yaml:4:3: mapping key "a" already defined`},
		{"bad size", "units:\n  a:\n    image: x\n    memory: lots\n", `virtkit.yaml:4: memory: size "lots"`},
		{"tiny memory", "units:\n  a:\n    image: x\n    memory: 1M\n", "virtkit.yaml:4: memory"},
		{"bad volume size", "units:\n  a:\n    image: x\n    volumes:\n      - {name: d, path: /d, size: 1K}\n", "virtkit.yaml:5"},
		{"missing dep", "units:\n  a:\n    image: x\n    depends_on: [nope]\n", `depends_on "nope"`},
		{"no image", "units:\n  a:\n    cpus: 1\n", `virtkit.yaml:3: unit "a" has no image`},
		{"bad port", "units:\n  a:\n    image: x\n    ports: [\"99999:1\"]\n", "virtkit.yaml:4: port"},
		{"no units", "name: x\n", "no units"},
		{"bad name", "units:\n  Bad_Name:\n    image: x\n", "unit name"},
		{"bad subnet", "name: x\nsubnet: 10.78.0.0/33\nunits:\n  a:\n    image: x\n", `virtkit.yaml:2: subnet "10.78.0.0/33"`},
		{"not a subnet", "name: x\nsubnet: redis\nunits:\n  a:\n    image: x\n", "virtkit.yaml:2: subnet"},
		{"ipv6 subnet", "subnet: fd00::/64\nunits:\n  a:\n    image: x\n", "virtkit.yaml:1: subnet fd00::/64: want an IPv4"},
		{"tiny subnet", "subnet: 10.0.0.0/31\nunits:\n  a:\n    image: x\n", "virtkit.yaml:1: subnet"},
		{"host bits", "subnet: 10.78.0.1/24\nunits:\n  a:\n    image: x\n", "virtkit.yaml:1: subnet 10.78.0.1/24 has host bits set: did you mean 10.78.0.0/24?"},
		{"agent command", "units:\n  a:\n    image: x\n    mode: agent\n    command: [sh]\n", "virtkit.yaml:5: a command runs only in entrypoint mode"},
		{"empty program", "units:\n  a:\n    image: x\n    command: [\"\", x]\n", "virtkit.yaml:4: command"},
		{"bad env", "units:\n  a:\n    image: x\n    env: {\"A=B\": c}\n", "virtkit.yaml:4: env name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), "/p/virtkit.yaml")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	f.Add([]byte("units:\n  a:\n    image: x\n    depends_on: [a]\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		file, err := Parse(b, "/f/virtkit.yaml")
		if err == nil {
			if len(file.Order()) != len(file.Units) {
				t.Fatal("order lost units")
			}
		}
	})
}
