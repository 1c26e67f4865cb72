package netrelay

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies keeps the relay fit for the guest agent: no gVisor, NATS, zerolog or cobra.
func TestDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"gvisor.dev/", "github.com/nats-io/", "github.com/rs/zerolog", "github.com/spf13/cobra", "github.com/virtkit/virtkit/imaging"} {
			if strings.HasPrefix(dep, banned) {
				t.Errorf("netrelay depends on %s", dep)
			}
		}
	}
}
