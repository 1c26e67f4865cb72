package main_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// forbidden are the import path prefixes the guest binary must not pull in: the broker and NATS,
// gVisor's netstack, the CLI framework, the structured logger and the image code.
var forbidden = []string{
	"github.com/nats-io/",
	"gvisor.dev/",
	"github.com/spf13/cobra",
	"github.com/rs/zerolog",
	"github.com/virtkit/virtkit/imaging",
	"github.com/virtkit/virtkit/broker",
}

// deps lists every package pkg is built from, for the guest's target (linux).
func deps(t *testing.T, pkg string) []string {
	t.Helper()
	cmd := exec.Command("go", "list", "-deps", pkg)
	cmd.Dir = cmdtest.Root(t)
	cmd.Env = append(cmd.Environ(), "GOOS=linux", "CGO_ENABLED=0")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	return strings.Fields(string(out))
}

func violations(list []string) []string {
	var bad []string
	for _, dep := range list {
		for _, f := range forbidden {
			if strings.HasPrefix(dep, f) {
				bad = append(bad, dep)
			}
		}
	}
	return bad
}

// TestDeps keeps the guest binary small and self-contained.
func TestDeps(t *testing.T) {
	list := deps(t, "./cmd/virtkit-agent")
	if len(list) == 0 || list[len(list)-1] != "github.com/virtkit/virtkit/cmd/virtkit-agent" {
		t.Fatalf("go list -deps did not list the agent itself last: %v", list)
	}
	for _, dep := range violations(list) {
		t.Errorf("virtkit-agent depends on %s", dep)
	}
}

// TestDepsGuardBites proves the guard is not vacuous: the host binary, which does use NATS,
// cobra and zerolog, is caught by the same check.
func TestDepsGuardBites(t *testing.T) {
	bad := strings.Join(violations(deps(t, "./cmd/virtkit")), " ")
	for _, want := range []string{"github.com/nats-io/nats.go", "github.com/spf13/cobra", "github.com/rs/zerolog"} {
		if !strings.Contains(bad, want) {
			t.Errorf("the guard does not flag %s in cmd/virtkit", want)
		}
	}
}

// TestBinarySize keeps the guest binary, built as build.sh builds it, within 4 MiB.
func TestBinarySize(t *testing.T) {
	out := filepath.Join(t.TempDir(), "virtkit-agent")
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false", "-ldflags", "-s -w -buildid=", "-o", out, "./cmd/virtkit-agent")
	cmd.Dir = cmdtest.Root(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOAMD64=v1")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, b)
	}
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	const limit = 4 << 20
	t.Logf("virtkit-agent: %d bytes (%.2f MiB)", fi.Size(), float64(fi.Size())/(1<<20))
	if fi.Size() > limit {
		t.Errorf("virtkit-agent is %d bytes, over the %d-byte (4 MiB) budget: see what grew with `go tool nm -size -sort size`", fi.Size(), limit)
	}
}
