package fleet

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/agent/virtctl"
	"github.com/virtkit/virtkit/workers/launcher"
)

func TestVirtctlListJSON(t *testing.T) {
	for _, v := range []VirtctlList{{}, {All: true}, {Units: []string{"redis", "db"}}} {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		var back VirtctlList
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if back.All != v.All || strings.Join(back.Units, ",") != strings.Join(v.Units, ",") {
			t.Errorf("%+v -> %s -> %+v", v, b, back)
		}
	}
}

// TestHandleRefusals: permissions are decided from the stored definition before anything is
// asked of the broker.
func TestHandleRefusals(t *testing.T) {
	state := t.TempDir()
	c := NewController(ControllerConfig{StateDir: state})
	f, err := Parse([]byte(`name: app
units:
  builder: {image: x, virtctl: [redis]}
  admin: {image: x, virtctl: true}
  redis: {image: x}
  db: {image: x}
`), filepath.Join(state, "virtkit.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	a := &Applied{Name: f.Name, Up: true, Units: map[string]*AppliedUnit{}}
	for name, u := range f.Units {
		a.Units[name] = &AppliedUnit{Virtctl: u.Virtctl}
		a.Units[name].Request.Name = VMName(f.Name, name)
	}
	if err := c.save(a, []byte("src")); err != nil {
		t.Fatal(err)
	}
	if got, unit, ok := c.Owner("app-redis"); !ok || got.Name != "app" || unit != "redis" {
		t.Fatalf("Owner(app-redis) = %v %q %v", got, unit, ok)
	}
	if _, _, ok := c.Owner("redis"); ok {
		t.Fatal("a bare unit name owns a VM")
	}
	s := NewControlServer(c, nil, zerolog.Nop())
	ctx := context.Background()
	for _, tc := range []struct {
		from string
		req  virtctl.Request
		want string
	}{
		{"redis", virtctl.Request{Op: virtctl.OpLs}, "may not use virtctl"},
		{"redis", virtctl.Request{Op: virtctl.OpStop, Unit: "db"}, "may not use virtctl"},
		{"builder", virtctl.Request{Op: virtctl.OpStop, Unit: "db"}, "not in its virtctl list"},
		{"builder", virtctl.Request{Op: virtctl.OpStart, Unit: "nope"}, "no unit"},
		{"admin", virtctl.Request{Op: virtctl.OpRestart, Unit: "admin"}, "itself"},
		{"gone", virtctl.Request{Op: virtctl.OpLs}, "no longer part"},
	} {
		_, err := s.Handle(ctx, "app", tc.from, tc.req)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s %+v: %v; want %q", tc.from, tc.req, err, tc.want)
		}
	}
	// Stopping a unit that is not running is a no-op that needs no broker.
	if _, err := s.Handle(ctx, "app", "builder", virtctl.Request{Op: virtctl.OpStop, Unit: "redis"}); err != nil {
		t.Errorf("stop of a stopped unit: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(c.Dir("app"), "fleet.yaml")); string(b) != "src" {
		t.Errorf("stored source %q", b)
	}
}

func TestLevels(t *testing.T) {
	f, err := Parse([]byte(`units:
  builder: {image: x, depends_on: [api, cache]}
  api: {image: x, depends_on: [db]}
  db: {image: x}
  cache: {image: x}
  lone: {image: x}
`), "/p/virtkit.yaml")
	if err != nil {
		t.Fatal(err)
	}
	a := &Applied{Units: map[string]*AppliedUnit{}}
	for n, u := range f.Units {
		a.Units[n] = &AppliedUnit{DependsOn: u.DependsOn}
	}
	got, _ := json.Marshal(a.levels(a.order()))
	if string(got) != `[["db","cache","lone"],["api"],["builder"]]` {
		t.Errorf("levels %s", got)
	}
}

// TestResolve: a unit becomes a VM <fleet>-<unit> called <unit> on the fleet's LAN, with the
// fleet's subnet; its command, env and volumes become boot keys for the agent (entrypoint mode).
func TestResolve(t *testing.T) {
	state := t.TempDir()
	rootfs := filepath.Join(state, "rootfs.ext4")
	os.WriteFile(rootfs, nil, 0o600)
	c := NewController(ControllerConfig{StateDir: state,
		Convert: func(ctx context.Context, ref string) (Image, error) {
			return Image{Rootfs: rootfs, Cmd: []string{"/bin/img"}}, nil
		},
		NewVolume: func(ctx context.Context, path string, size int64) error { return os.WriteFile(path, nil, 0o600) },
	})
	f, err := Parse([]byte(`name: shop
subnet: 10.78.0.0/24
units:
  redis:
    image: x
    command: [redis-server, --dir, "/data dir"]
    env: {B: "2", A: "x y"}
    volumes: [{name: data, path: /data, size: 64M}, {name: logs, path: /logs, size: 16M}]
  builder: {image: x, shares: [{host: ./src, guest: /src}], env: {CI: "1"}}
`), filepath.Join(state, "p", "virtkit.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	a, err := c.Resolve(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	r := a.Units["redis"].Request
	want := []string{
		"virtkit.volume=/dev/vdc:/data,/dev/vdd:/logs",
		"virtkit.command=b64:" + base64.StdEncoding.EncodeToString([]byte(`["redis-server","--dir","/data dir"]`)),
		"virtkit.env=b64:" + base64.StdEncoding.EncodeToString([]byte(`["A=x y","B=2"]`)),
	}
	if d := cmp.Diff(want, r.Cmdline); d != "" {
		t.Errorf("redis boot keys (-want +got):\n%s", d)
	}
	if r.Name != "shop-redis" || r.Host != "redis" || r.LAN != "fleet-shop" || r.Subnet != "10.78.0.0/24" || r.Mode != "entrypoint" || len(r.Disks) != 2 {
		t.Errorf("redis request %+v", r)
	}
	b := a.Units["builder"].Request
	if b.Mode != "agent" || len(b.Cmdline) != 1 || !strings.HasPrefix(b.Cmdline[0], "virtkit.env=b64:") {
		t.Errorf("builder request %+v", b)
	}
	if a.Subnet != "10.78.0.0/24" || a.Source != f.Path {
		t.Errorf("applied subnet %q source %q", a.Subnet, a.Source)
	}
}

// TestCheckOthers: a fleet subnet may not overlap the subnet of another fleet that is up, and a
// fleet's VM names may not be another fleet's.
func TestCheckOthers(t *testing.T) {
	c := NewController(ControllerConfig{StateDir: t.TempDir()})
	if err := c.save(&Applied{Name: "one", Source: "/a/virtkit.yaml", Subnet: "10.78.0.0/24", Up: true}, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.save(&Applied{Name: "down", Subnet: "10.79.0.0/24"}, nil); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, subnet, want string }{
		{"two", "10.78.0.128/25", "subnet 10.78.0.128/25 overlaps subnet 10.78.0.0/24 of fleet one (from /a/virtkit.yaml)"},
		{"two", "10.0.0.0/8", "overlaps"},
		{"two", "10.79.0.0/24", ""}, // fleet down is not up
		{"two", "", ""},
		{"one", "10.78.0.0/24", ""}, // itself
	} {
		err := c.checkOthers(&Applied{Name: tc.name, Subnet: tc.subnet})
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s %s: %v; want %q", tc.name, tc.subnet, err, tc.want)
		}
	}
	one := &Applied{Name: "a-b", Up: true, Units: map[string]*AppliedUnit{"c": {Request: launcher.Request{Name: VMName("a-b", "c")}}}}
	if err := c.save(one, nil); err != nil {
		t.Fatal(err)
	}
	two := &Applied{Name: "a", Units: map[string]*AppliedUnit{"b-c": {Request: launcher.Request{Name: VMName("a", "b-c")}}}}
	if err := c.checkOthers(two); err == nil || !strings.Contains(err.Error(), "VM name a-b-c is fleet a-b's unit c") {
		t.Errorf("clashing VM names: %v", err)
	}
}

// TestLockAcrossControllers: two controllers on one state folder (a `fleet up` and a daemon
// resuming the same fleet are two processes) take a fleet's lock one at a time; other fleets'
// locks are independent; a wait ends with its context.
func TestLockAcrossControllers(t *testing.T) {
	dir := t.TempDir()
	a := NewController(ControllerConfig{StateDir: dir})
	b := NewController(ControllerConfig{StateDir: dir})
	ctx := context.Background()
	lock := func(c *Controller, fleet string) <-chan func() {
		ch := make(chan func(), 1)
		go func() {
			u, err := c.lock(ctx, fleet)
			if err != nil {
				t.Error(err)
				u = func() {}
			}
			ch <- u
		}()
		return ch
	}
	unlockA, err := a.lock(ctx, "devf")
	if err != nil {
		t.Fatal(err)
	}
	got := lock(b, "devf")
	select {
	case <-got:
		t.Fatal("a second controller took the fleet's lock while the first held it")
	case <-time.After(200 * time.Millisecond):
	}
	select {
	case u := <-lock(b, "devg"):
		u()
	case <-time.After(5 * time.Second):
		t.Fatal("another fleet's lock waited for this one")
	}
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if _, err := NewController(ControllerConfig{StateDir: dir}).lock(short, "devf"); err == nil {
		t.Fatal("a lock wait outlived its context")
	}
	unlockA()
	select {
	case u := <-got:
		u()
	case <-time.After(5 * time.Second):
		t.Fatal("the second controller never got the lock after the first let go")
	}
}
