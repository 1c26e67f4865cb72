package fleet

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/agent/virtctl"
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
	if got, unit, ok := c.Owner("redis"); !ok || got.Name != "app" || unit != "redis" {
		t.Fatalf("Owner(redis) = %v %q %v", got, unit, ok)
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
