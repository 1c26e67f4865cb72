package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestQuickFleet: --builder/--service describe a valid fleet: services first, the builder with
// the working folder and virtctl; bad --service values are refused.
func TestQuickFleet(t *testing.T) {
	dir := t.TempDir()
	wd, _ := os.Getwd()
	defer os.Chdir(wd)
	os.Chdir(dir)
	f, src, err := loadFleet(&fleetFlags{builder: "docker://debian:bookworm", services: []string{"redis:tar:/x/redis.tar", "db:oci:/y"}, name: "quick"})
	if err != nil {
		t.Fatalf("%v\n%s", err, src)
	}
	if f.Name != "quick" || len(f.Units) != 3 || f.Units["redis"].Image != "tar:/x/redis.tar" {
		t.Fatalf("%+v", f)
	}
	b := f.Units["builder"]
	if b.Mode != "agent" || !b.Virtctl.All || len(b.Shares) != 1 || b.Shares[0].Guest != "/src" || b.Shares[0].Host != dir {
		t.Errorf("builder %+v", b)
	}
	if got := strings.Join(f.Order(), ","); got != "db,redis,builder" {
		t.Errorf("order %s", got)
	}
	if _, _, err := loadFleet(&fleetFlags{services: []string{"redis"}}); err == nil {
		t.Error("--service without an image was accepted")
	}
	if _, _, err := loadFleet(&fleetFlags{builder: "x", file: "virtkit.yaml"}); err == nil {
		t.Error("-f with --builder was accepted")
	}
	// A bad file names its line.
	os.WriteFile(filepath.Join(dir, "virtkit.yaml"), []byte("units:\n  a:\n    image: x\n    cpus: 99\n"), 0o644)
	if _, _, err := loadFleet(&fleetFlags{}); err == nil || !strings.Contains(err.Error(), "virtkit.yaml:4") {
		t.Errorf("bad file: %v", err)
	}
}
