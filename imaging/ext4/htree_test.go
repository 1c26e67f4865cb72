package ext4_test

import (
	"archive/tar"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

// bigDirTar makes a directory of n entries with names of varied length (including non-ASCII
// bytes, which exercise the unsigned hash variant) plus a few siblings.
func bigDirTar(t testing.TB, n int) ([]byte, []string) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "big/", Mode: 0o755, ModTime: t0})
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("f%d-%s", i, strings.Repeat("x", i%40))
		if i%97 == 0 {
			names[i] += "-\xc3\xa9\xff"
		}
		h := &tar.Header{Typeflag: tar.TypeReg, Name: "big/" + names[i], Mode: 0o644, ModTime: t0, Format: tar.FormatPAX}
		if i%1000 == 0 {
			h.Typeflag = tar.TypeDir
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
	}
	tw.Close()
	return buf.Bytes(), names
}

func TestLargeDirectory(t *testing.T) {
	for _, n := range []int{200, 30000, 100000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			if n > 50000 {
				cmdtest.Heavy(t)
			}
			tb, names := bigDirTar(t, n)
			img, _ := writeTar(t, tb, ext4.Options{})
			st := ext4test.Stat(t, img, "/big")[0]
			if st.Flags&0x1000 == 0 {
				t.Fatalf("/big is not htree-indexed (flags %#x)", st.Flags)
			}
			if want := uint32(2 + (n+999)/1000); st.Links != want {
				t.Errorf("/big links %d, want %d", st.Links, want)
			}
			htree := ext4test.Debugfs(t, img, "htree_dump /big")
			if strings.Contains(htree, "Corrupt") || strings.Contains(htree, "does not match") || strings.Contains(htree, "nvalid") {
				t.Fatalf("htree_dump complains:\n%.2000s", htree)
			}
			var sample []string
			for i := 0; i < n; i += n / 50 {
				sample = append(sample, "/big/"+names[i])
			}
			for i, in := range ext4test.Stat(t, img, sample...) {
				if in == nil {
					t.Errorf("%q missing", sample[i])
				}
			}
			mountCheck(t, img, "big", names)
		})
	}
}

// mountCheck mounts the image read-only with the kernel's ext4 (root only) and looks every name
// up: a wrong htree hash makes the kernel miss entries that a linear scan would find.
func mountCheck(t *testing.T, img, dir string, names []string) {
	t.Helper()
	if os.Geteuid() != 0 {
		return // the e2fsck and debugfs checks above stand; the kernel view needs root
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "ro,loop", img, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	missing := 0
	for _, name := range names {
		if _, err := os.Lstat(filepath.Join(mnt, dir, name)); err != nil {
			missing++
			if missing < 5 {
				t.Errorf("kernel lookup: %v", err)
			}
		}
	}
	ents, err := os.ReadDir(filepath.Join(mnt, dir))
	if err != nil || len(ents) != len(names) {
		t.Errorf("kernel readdir: %d entries, %v; want %d", len(ents), err, len(names))
	}
	if missing > 0 {
		t.Errorf("kernel lookup missed %d of %d names", missing, len(names))
	}
}

func bytesReader(b []byte) *bytes.Reader { return bytes.NewReader(b) }
