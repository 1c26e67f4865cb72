package ext4_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

// TestKernelReadWrite mounts images read-write with the kernel's ext4 (journal replay path,
// allocator, htree insertion into our directories), writes and deletes, and checks the result
// with e2fsck: the per-VM writable disk case.
func TestKernelReadWrite(t *testing.T) {
	cmdtest.RequireRoot(t)
	cases := map[string]func(string) error{
		"empty": func(img string) error {
			_, err := ext4.WriteEmpty(context.Background(), img, ext4.Options{Size: 256 << 20})
			return err
		},
		// Sixteen groups, fifteen of them INODE_UNINIT: the kernel initialises them as it spreads
		// new directories over the groups.
		"empty-groups": func(img string) error {
			_, err := ext4.WriteEmpty(context.Background(), img, ext4.Options{Size: 2 << 30})
			return err
		},
		"tree": func(img string) error {
			tb, _ := bigDirTar(t, 5000)
			_, err := ext4.WriteTar(context.Background(), bytesReader(tb), img, ext4.Options{Free: 64 << 20})
			return err
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "rw.ext4")
			if err := mk(img); err != nil {
				t.Fatal(err)
			}
			mnt := t.TempDir()
			if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
				t.Fatalf("mount: %v\n%s", err, out)
			}
			mounted := true
			t.Cleanup(func() {
				if mounted {
					exec.Command("umount", mnt).Run()
				}
			})
			for i := 0; i < 16; i++ {
				d := filepath.Join(mnt, fmt.Sprintf("spread-%d", i))
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(d, "f"), []byte("x"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			big := filepath.Join(mnt, "big")
			os.MkdirAll(big, 0o755)
			for i := 0; i < 3000; i++ {
				if err := os.WriteFile(filepath.Join(big, fmt.Sprintf("new-%d", i)), []byte(fmt.Sprint(i)), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.WriteFile(filepath.Join(mnt, "blob"), randBytes(11, 20<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 3000; i += 2 {
				os.Remove(filepath.Join(big, fmt.Sprintf("new-%d", i)))
			}
			if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
				t.Fatalf("umount: %v\n%s", err, out)
			}
			mounted = false
			ext4test.Fsck(t, img)
			if st := ext4test.Stat(t, img, "/big/new-2999", "/blob"); st[0] == nil || st[1] == nil || st[1].Size != 20<<20 {
				t.Fatalf("kernel writes not in the image: %+v %+v", st[0], st[1])
			}
		})
	}
}
