package ext4bench

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

// BenchmarkDebianTree converts the cached debootstrap tree with WriteDir (mke2fs -d's input).
func BenchmarkDebianTree(b *testing.B) {
	dir := ext4test.Debootstrap(b)
	out := filepath.Join(b.TempDir(), "out.ext4")
	for i := 0; i < b.N; i++ {
		if _, err := ext4.WriteDir(context.Background(), dir, out, ext4.Options{}); err != nil {
			b.Fatal(err)
		}
	}
}
