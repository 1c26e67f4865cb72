package rootfs_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/rootfs"
)

type F = imagetest.File

var (
	dir  = imagetest.Dir
	reg  = imagetest.Reg
	sym  = imagetest.Symlink
	hard = imagetest.Hardlink
	wh   = imagetest.Whiteout
	opq  = imagetest.Opaque
)

func layersOf(t *testing.T, gz bool, tars ...[]byte) []rootfs.Layer {
	var ls []rootfs.Layer
	for _, b := range tars {
		if gz {
			b = imagetest.Gzip(t, b)
		}
		blob := b
		ls = append(ls, rootfs.Layer{Digest: imagetest.Digest(blob), Open: func(context.Context) (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(blob)), nil
		}})
	}
	return ls
}

func flatten(t *testing.T, tars ...[]byte) (map[string]imagetest.Meta, error) {
	t.Helper()
	var out bytes.Buffer
	_, err := rootfs.Flatten(context.Background(), layersOf(t, true, tars...), &out, rootfs.Options{})
	if err != nil {
		return nil, err
	}
	return imagetest.ReadTar(t, &out), nil
}

func file(body string) imagetest.Meta {
	return fileMode(body, 0o644)
}

func fileMode(body string, mode int64) imagetest.Meta {
	return imagetest.Meta{Type: tar.TypeReg, Mode: mode, Size: int64(len(body)), Digest: strings.TrimPrefix(imagetest.Digest([]byte(body)), "sha256:")}
}

var (
	d   = imagetest.Meta{Type: tar.TypeDir, Mode: 0o755}
	lnk = func(target string) imagetest.Meta {
		return imagetest.Meta{Type: tar.TypeSymlink, Mode: 0o777, Link: target}
	}
)

func TestFlatten(t *testing.T) {
	for _, tc := range []struct {
		name   string
		layers [][]F
		want   map[string]imagetest.Meta
	}{{
		name: "whiteouts and opaque dirs",
		layers: [][]F{
			{dir("etc"), reg("etc/a", "a"), reg("etc/b", "b"), dir("var"), dir("var/lib"), reg("var/lib/x", "x"), dir("var/lib/sub"), reg("var/lib/sub/y", "y")},
			{wh("etc/a"), dir("var/lib"), opq("var/lib"), reg("var/lib/new", "n")},
		},
		want: map[string]imagetest.Meta{"etc": d, "etc/b": file("b"), "var": d, "var/lib": d, "var/lib/new": file("n")},
	}, {
		name: "whiteout in the same layer hides only lower layers",
		layers: [][]F{
			{reg("a", "old"), dir("d"), reg("d/x", "x")},
			{reg("a", "new"), wh("a"), reg("d/y", "y"), opq("d")},
		},
		want: map[string]imagetest.Meta{"a": file("new"), "d": d, "d/y": file("y")},
	}, {
		name: "file replaced by a directory and back",
		layers: [][]F{
			{reg("p", "file"), dir("q"), reg("q/inner", "i")},
			{dir("p"), reg("p/child", "c"), reg("q", "now a file")},
			{reg("p", "file again"), dir("q"), reg("q/z", "z")},
		},
		want: map[string]imagetest.Meta{"p": file("file again"), "q": d, "q/z": file("z")},
	}, {
		name: "hard links across layers",
		layers: [][]F{
			{dir("bin"), reg("bin/busybox", "bb"), reg("bin/gone", "g")},
			{hard("bin/sh", "bin/busybox"), hard("bin/keep", "bin/gone")},
			{wh("bin/gone"), wh("bin/busybox"), hard("bin/ls", "bin/sh")},
		},
		want: map[string]imagetest.Meta{"bin": d, "bin/sh": file("bb"), "bin/ls": file("bb"), "bin/keep": file("g")},
	}, {
		name: "rewriting one name of a hard-linked file breaks the link",
		layers: [][]F{
			{reg("a", "1"), hard("b", "a")},
			{reg("a", "2")},
		},
		want: map[string]imagetest.Meta{"a": file("2"), "b": file("1")},
	}, {
		name: "symlinked directories are followed inside the image",
		layers: [][]F{
			{dir("usr"), dir("usr/lib"), sym("lib", "usr/lib"), sym("abs", "/usr/lib"), sym("esc", "../../../../usr")},
			{reg("lib/a", "a"), reg("abs/b", "b"), reg("esc/c", "c"), wh("lib/x")},
		},
		want: map[string]imagetest.Meta{"usr": d, "usr/lib": d, "lib": lnk("usr/lib"), "abs": lnk("/usr/lib"),
			"esc": lnk("../../../../usr"), "usr/lib/a": file("a"), "usr/lib/b": file("b"), "usr/c": file("c")},
	}, {
		name: "a symlink replaced by a directory",
		layers: [][]F{
			{dir("real"), reg("real/f", "f"), sym("link", "real")},
			{dir("link"), reg("link/g", "g")},
		},
		want: map[string]imagetest.Meta{"real": d, "real/f": file("f"), "link": d, "link/g": file("g")},
	}, {
		name: "implicit parents, duplicate entries, aufs metadata",
		layers: [][]F{
			{reg("deep/er/f", "1"), reg("deep/er/f", "2"), reg(".wh..wh.plnk/123.456", "x"), F{Name: "m", Body: "m", Mode: 0o4755, UID: 7, GID: 8}},
		},
		want: map[string]imagetest.Meta{"deep": d, "deep/er": d, "deep/er/f": file("2"),
			"m": {Type: tar.TypeReg, Mode: 0o4755, UID: 7, GID: 8, Size: 1, Digest: file("m").Digest}},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			var tars [][]byte
			for _, l := range tc.layers {
				tars = append(tars, imagetest.Tar(t, l...))
			}
			got, err := flatten(t, tars...)
			if err != nil {
				t.Fatal(err)
			}
			if diff := imagetest.Diff(tc.want, got); len(diff) > 0 {
				t.Errorf("flattened tree differs:\n%s", strings.Join(diff, "\n"))
			}
		})
	}
}

func TestFlattenErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		layers [][]F
		want   string
	}{
		{"dot-dot name", [][]F{{reg("a/../../etc/passwd", "x")}}, "path traversal"},
		{"dot-dot hard link", [][]F{{hard("a", "../../etc/shadow")}}, "path traversal"},
		{"hard link to nothing", [][]F{{hard("a", "missing")}}, "does not exist"},
		{"hard link to a directory", [][]F{{dir("d"), hard("a", "d")}}, "is a directory"},
		{"hard link forward", [][]F{{hard("a", "b"), reg("b", "b")}}, "does not exist"},
		{"symlink loop", [][]F{{sym("a", "b"), sym("b", "a")}, {reg("a/x", "x")}}, "too many levels"},
		{"file under a file", [][]F{{reg("a", "x")}, {reg("a/b", "y")}}, "not a directory"},
		{"root is a file", [][]F{{F{Name: ".", Type: tar.TypeReg, Body: "x"}}}, "root entry"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var tars [][]byte
			for _, l := range tc.layers {
				tars = append(tars, imagetest.Tar(t, l...))
			}
			_, err := flatten(t, tars...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestFlattenChecksDigests(t *testing.T) {
	good := imagetest.Tar(t, reg("a", "hello"))
	ls := layersOf(t, true, good)
	ls[0].Digest = imagetest.Digest([]byte("something else"))
	_, err := rootfs.Flatten(context.Background(), ls, io.Discard, rootfs.Options{})
	if !errors.Is(err, rootfs.ErrDigest) {
		t.Fatalf("wrong digest: error %v, want ErrDigest", err)
	}
	ls = layersOf(t, false, good)
	ls[0].DiffID = imagetest.Digest([]byte("not the diff id"))
	if _, err := rootfs.Flatten(context.Background(), ls, io.Discard, rootfs.Options{}); !errors.Is(err, rootfs.ErrDigest) {
		t.Fatalf("wrong diff_id: error %v, want ErrDigest", err)
	}
	// A blob that changes between the two passes (a cache file rewritten underneath) is caught.
	calls := 0
	gz := imagetest.Gzip(t, good)
	other := imagetest.Gzip(t, imagetest.Tar(t, reg("a", "HELLO")))
	ls = []rootfs.Layer{{Open: func(context.Context) (io.ReadCloser, error) {
		calls++
		if calls == 1 {
			return io.NopCloser(bytes.NewReader(gz)), nil
		}
		return io.NopCloser(bytes.NewReader(other)), nil
	}, Digest: imagetest.Digest(gz)}}
	if _, err := rootfs.Flatten(context.Background(), ls, io.Discard, rootfs.Options{}); !errors.Is(err, rootfs.ErrDigest) {
		t.Fatalf("changed blob: error %v, want ErrDigest", err)
	}
}

func TestFlattenLimits(t *testing.T) {
	// 64 MiB of zeros compress to ~64 KiB: a small zip bomb against an 8 MiB limit.
	bomb := imagetest.Tar(t, F{Name: "zeros", Body: string(make([]byte, 64<<20))})
	ls := layersOf(t, true, bomb)
	_, err := rootfs.Flatten(context.Background(), ls, io.Discard, rootfs.Options{Limits: rootfs.Limits{MaxBytes: 8 << 20}})
	if !errors.Is(err, rootfs.ErrLimit) {
		t.Fatalf("zip bomb: error %v, want ErrLimit", err)
	}
	many := make([]F, 100)
	for i := range many {
		many[i] = reg(strings.Repeat("f", i+1), "")
	}
	ls = layersOf(t, false, imagetest.Tar(t, many...))
	_, err = rootfs.Flatten(context.Background(), ls, io.Discard, rootfs.Options{Limits: rootfs.Limits{MaxEntries: 50}})
	if !errors.Is(err, rootfs.ErrLimit) {
		t.Fatalf("too many entries: error %v, want ErrLimit", err)
	}
}

// The TOC round-trips through its cache encoding and lets the first pass skip the blob.
func TestTOCCache(t *testing.T) {
	tb := imagetest.Tar(t, dir("a"), reg("a/b", "bee"), F{Name: "x", Body: "y", Xattrs: map[string]string{"user.k": "v"}})
	ls := layersOf(t, true, tb)
	toc, err := rootfs.ReadTOC(context.Background(), ls[0], rootfs.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := toc.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	back, err := rootfs.UnmarshalTOC(b)
	if err != nil {
		t.Fatal(err)
	}
	if back.DiffID != imagetest.Digest(tb) || back.Digest != ls[0].Digest || len(back.Entries) != 3 {
		t.Fatalf("toc %+v", back)
	}
	opened := 0
	open := ls[0].Open
	ls[0].Open = func(ctx context.Context) (io.ReadCloser, error) { opened++; return open(ctx) }
	ls[0].TOC = back
	var out bytes.Buffer
	if _, err := rootfs.Flatten(context.Background(), ls, &out, rootfs.Options{}); err != nil {
		t.Fatal(err)
	}
	if opened != 1 {
		t.Errorf("blob opened %d times with a cached TOC, want 1", opened)
	}
	tr := tar.NewReader(&out)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatal("no x in output")
		}
		if h.Name == "x" {
			if h.PAXRecords["SCHILY.xattr.user.k"] != "v" {
				t.Errorf("xattr lost: %v", h.PAXRecords)
			}
			break
		}
	}
	if _, err := rootfs.UnmarshalTOC([]byte("garbage")); err == nil {
		t.Error("garbage TOC decoded")
	}
}

func TestResolve(t *testing.T) {
	ls := layersOf(t, false, imagetest.Tar(t, dir("usr"), dir("usr/sbin"), sym("sbin", "usr/sbin"), sym("abs", "/usr"), sym("loop", "loop")))
	toc, err := rootfs.ReadTOC(context.Background(), ls[0], rootfs.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := rootfs.Merge([]*rootfs.TOC{toc}, rootfs.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	for in, want := range map[string]string{
		"/sbin/virtkit-agent": "usr/sbin/virtkit-agent", "/.virtkit/image.json": ".virtkit/image.json",
		"/abs/x/y": "usr/x/y", "/sbin": "sbin", "/loop/x": "loop/x", "/": ".",
	} {
		if got, err := tr.Resolve(in); err != nil || got != want {
			t.Errorf("Resolve(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := tr.Resolve("/../x"); err == nil {
		t.Error("Resolve accepted ..")
	}
}
