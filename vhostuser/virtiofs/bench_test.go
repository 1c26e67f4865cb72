package virtiofs

import (
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkInProcessRead1M is the harness read path without process boundaries, for profiling.
func BenchmarkInProcessRead1M(b *testing.B) {
	share := b.TempDir()
	os.WriteFile(filepath.Join(share, "f"), make([]byte, 1<<20), 0o644)
	c := inProcess(b, share, nil)
	e, err := c.Lookup(root, "f")
	if err != nil {
		b.Fatal(err)
	}
	fh, err := c.Open(e.NodeID, uint32(os.O_RDONLY))
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(1 << 20)
	for i := 0; i < b.N; i++ {
		if _, err := c.Read(e.NodeID, fh, 0, 1<<20); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkInProcessGetattr measures per-request overhead.
func BenchmarkInProcessGetattr(b *testing.B) {
	c := inProcess(b, b.TempDir(), nil)
	for i := 0; i < b.N; i++ {
		if _, err := c.Getattr(root); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkInProcessLookup measures a repeated LOOKUP of a known name.
func BenchmarkInProcessLookup(b *testing.B) {
	share := b.TempDir()
	os.WriteFile(filepath.Join(share, "f"), nil, 0o644)
	c := inProcess(b, share, nil)
	for i := 0; i < b.N; i++ {
		if _, err := c.Lookup(root, "f"); err != nil {
			b.Fatal(err)
		}
	}
}
