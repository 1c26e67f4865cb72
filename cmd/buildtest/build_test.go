// Package buildtest proves that ./build.sh is reproducible: the same source tree built in two
// different folders gives byte-identical binaries. It holds tests only.
package buildtest

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// copyTree copies the tracked and untracked-but-not-ignored files of the checkout at root into dst.
func copyTree(t *testing.T, root, dst string) {
	t.Helper()
	cmd := exec.Command("git", "ls-files", "-co", "--exclude-standard", "-z")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("git ls-files: %v", err)
	}
	n := 0
	for _, rel := range strings.Split(string(out), "\x00") {
		if rel == "" {
			continue
		}
		src := filepath.Join(root, rel)
		fi, err := os.Lstat(src)
		if os.IsNotExist(err) {
			continue // deleted in the working tree but still in the index
		}
		if err != nil {
			t.Fatal(err)
		}
		to := filepath.Join(dst, rel)
		if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
			t.Fatal(err)
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(src)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(target, to); err != nil {
				t.Fatal(err)
			}
		case fi.Mode().IsRegular():
			if err := copyFile(src, to, fi.Mode().Perm()); err != nil {
				t.Fatal(err)
			}
		default:
			continue
		}
		n++
	}
	if n < 10 {
		t.Fatalf("only %d files copied from %s", n, root)
	}
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// build runs ./build.sh in dir with the output in dir/<dist>.
func build(t *testing.T, dir, dist string) string {
	t.Helper()
	cmd := exec.Command("./build.sh")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "DIST="+dist, "VERSION=buildtest")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s/build.sh: %v\n%s", dir, err, out)
	}
	return filepath.Join(dir, dist)
}

func TestReproducibleBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds both binaries twice")
	}
	root := cmdtest.Root(t)
	base := t.TempDir()
	// Different depths and names, so any path that leaks into a binary shows up.
	a := filepath.Join(base, "a")
	b := filepath.Join(base, "second", "checkout-b")
	copyTree(t, root, a)
	copyTree(t, root, b)
	distA := build(t, a, "dist")
	distB := build(t, b, "out/elsewhere")
	for _, name := range []string{"virtkit", "virtkit-agent", "build-info.txt"} {
		x, err := os.ReadFile(filepath.Join(distA, name))
		if err != nil {
			t.Fatal(err)
		}
		y, err := os.ReadFile(filepath.Join(distB, name))
		if err != nil {
			t.Fatal(err)
		}
		if len(x) == 0 {
			t.Errorf("%s is empty", name)
		}
		if !bytes.Equal(x, y) {
			t.Errorf("%s differs between the two builds: sha256 %x vs %x (sizes %d, %d)", name, sha256.Sum256(x), sha256.Sum256(y), len(x), len(y))
			continue
		}
		if bytes.Contains(x, []byte(base)) {
			t.Errorf("%s contains the build folder %s", name, base)
		}
		t.Logf("%s: %d bytes, sha256 %x", name, len(x), sha256.Sum256(x))
	}
	sums, err := os.ReadFile(filepath.Join(distA, "SHA256SUMS"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"virtkit", "virtkit-agent"} {
		data, _ := os.ReadFile(filepath.Join(distA, name))
		if want := fmt.Sprintf("%x  %s", sha256.Sum256(data), name); !strings.Contains(string(sums), want) {
			t.Errorf("SHA256SUMS lacks %q:\n%s", want, sums)
		}
	}
}
