package ext4_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

// TestDebianRootfs converts a real root filesystem, from its tar and from the tree itself, and
// compares the image with the tree file by file.
func TestDebianRootfs(t *testing.T) {
	dir := ext4test.Debootstrap(t)
	tarball := ext4test.DebianTar(t)
	t.Run("tar", func(t *testing.T) {
		f, err := os.Open(tarball)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		img := filepath.Join(t.TempDir(), "rootfs.ext4")
		res, err := ext4.WriteTar(context.Background(), f, img, ext4.Options{})
		if err != nil {
			t.Fatal(err)
		}
		ext4test.Fsck(t, img)
		ext4test.CompareTree(t, img, dir)
		t.Logf("uuid %s, %d bytes", res.UUID, res.Size)
	})
	t.Run("dir", func(t *testing.T) {
		img := filepath.Join(t.TempDir(), "rootfs.ext4")
		a, err := ext4.WriteDir(context.Background(), dir, img, ext4.Options{})
		if err != nil {
			t.Fatal(err)
		}
		ext4test.Fsck(t, img)
		ext4test.CompareTree(t, img, dir)
		img2 := filepath.Join(t.TempDir(), "again.ext4")
		b, err := ext4.WriteDir(context.Background(), dir, img2, ext4.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if a != b || fileSum(t, img) != fileSum(t, img2) {
			t.Fatalf("WriteDir of an unchanged tree is not reproducible: %+v %+v", a, b)
		}
		if fp, err := ext4.FingerprintDir(context.Background(), dir, ext4.Options{}); err != nil || fp != a.UUID {
			t.Fatalf("FingerprintDir = %s, %v; image %s", fp, err, a.UUID)
		}
	})
}
