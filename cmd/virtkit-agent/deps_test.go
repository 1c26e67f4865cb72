package main_test

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// TestDeps keeps the guest binary small and self-contained: no broker, netstack, CLI framework,
// structured logger or image code may creep in.
func TestDeps(t *testing.T) {
	cmd := exec.Command("go", "list", "-deps", "./cmd/virtkit-agent")
	cmd.Dir = cmdtest.Root(t)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, bad := range []string{"github.com/nats-io/", "gvisor.dev/", "github.com/spf13/cobra", "github.com/rs/zerolog", "github.com/virtkit/virtkit/imaging", "github.com/virtkit/virtkit/broker"} {
			if strings.HasPrefix(dep, bad) {
				t.Errorf("virtkit-agent depends on %s", dep)
			}
		}
	}
}
