// Package cmdtest helps tests find and build virtkit's own artefacts: the repository root, freshly
// built binaries (virtkit, virtkit-agent), the guest kernel, and required host tools.
//
// Requirement helpers skip only under `go test -short`; in a full run (and so in CI, where .ci/run
// installs everything) a missing requirement is a test failure, never a silent skip.
package cmdtest

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Root returns the repository root (the folder holding go.mod).
func Root(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("cmdtest: no go.mod above the test's folder")
		}
		dir = parent
	}
}

var (
	buildMu  sync.Mutex
	builtDir string
	built    = map[string]string{}
)

// Binary builds ./cmd/<name> (static, CGO_ENABLED=0) once per test process and returns its path.
func Binary(t testing.TB, name string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[name]; ok {
		return p
	}
	if builtDir == "" {
		d, err := os.MkdirTemp("", "vk-bin-")
		if err != nil {
			t.Fatal(err)
		}
		// World-searchable: sandboxed helpers (virtiofsd with id maps) re-execute the binary as an
		// unprivileged host user.
		os.Chmod(d, 0o755)
		builtDir = d // removed by the OS tmp cleaner; binaries are reused across tests of the process
	}
	out := filepath.Join(builtDir, name)
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./cmd/"+name)
	cmd.Dir = Root(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cmdtest: build %s: %v\n%s", name, err, b)
	}
	built[name] = out
	return out
}

// Kernel returns the guest kernel: $VIRTKIT_KERNEL, else dist/vmlinux made by ./build-kernel.sh.
func Kernel(t testing.TB) string {
	t.Helper()
	p := os.Getenv("VIRTKIT_KERNEL")
	if p == "" {
		p = filepath.Join(Root(t), "dist", "vmlinux")
	}
	if _, err := os.Stat(p); err != nil {
		Missing(t, "guest kernel %s (run ./build-kernel.sh): %v", p, err)
	}
	return p
}

// Tool returns the path of a host program, or fails (skips under -short) when it is absent.
func Tool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/lib/qemu"} {
			if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
				return filepath.Join(dir, name)
			}
		}
		Missing(t, "host tool %s not installed (./test.sh installs it)", name)
	}
	return p
}

// Root privileges are needed for namespace, tap and mount tests.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "this test needs root (namespaces, taps or mounts)")
	}
}

// Heavy marks a test that boots VMs or builds large fixtures: skipped under -short only.
func Heavy(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("heavy test: skipped with -short")
	}
}

// Missing reports an unmet requirement: a skip under -short, a failure otherwise.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if testing.Short() {
		t.Skipf("-short: "+format, args...)
	}
	t.Fatalf(format, args...)
}

// Buffer is a bytes.Buffer that a child process's stdout and stderr and a reading test may use
// at once.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns what was written so far.
func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
