package archive

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestEntryName(t *testing.T) {
	for in, want := range map[string]string{
		"a/b":        "a/b",
		"/abs/x":     "abs/x",
		"../../x":    "x",
		"a/../../b/": "b",
		"./":         ".",
		`a\..\..\b`:  "b",
		"a//b/./c":   "a/b/c",
	} {
		if got, err := entryName(in); err != nil || got != want {
			t.Errorf("entryName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestPackSingleFile(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o755)
	var b bytes.Buffer
	if err := Pack(&b, filepath.Join(dir, "f")); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	if err := Unpack(&b, out); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(out, "f"))
	if err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("unpacked: %v %v", fi, err)
	}
}

// FuzzUnpack extracts arbitrary tar streams: errors are fine; writing outside the destination
// or panicking is not.
func FuzzUnpack(f *testing.F) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	tw.WriteHeader(&tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755})
	tw.WriteHeader(&tar.Header{Name: "d/f", Typeflag: tar.TypeReg, Mode: 0o644, Size: 2})
	tw.Write([]byte("hi"))
	tw.WriteHeader(&tar.Header{Name: "d/l", Typeflag: tar.TypeSymlink, Linkname: "../../.."})
	tw.WriteHeader(&tar.Header{Name: "d/l/x", Typeflag: tar.TypeReg, Size: 0})
	tw.WriteHeader(&tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "d/f"})
	tw.Close()
	f.Add(b.Bytes())
	f.Add([]byte("not a tar"))
	f.Fuzz(func(t *testing.T, data []byte) {
		parent := t.TempDir()
		dst := filepath.Join(parent, "dst")
		_ = Unpack(bytes.NewReader(data), dst)
		entries, _ := os.ReadDir(parent)
		for _, e := range entries {
			if e.Name() != "dst" {
				t.Fatalf("wrote %s outside the destination", e.Name())
			}
		}
		filepath.WalkDir(dst, func(p string, d os.DirEntry, err error) error {
			if err == nil && !strings.HasPrefix(p, dst) {
				t.Fatalf("walked out to %s", p)
			}
			return nil
		})
	})
}
