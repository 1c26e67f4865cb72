package rootfs_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/rootfs"
)

// FuzzFlatten feeds arbitrary bytes as two layers (split at the first "LAYER" marker). Flatten
// must not panic and, when it succeeds, must write a tar whose names are clean and whose hard
// links point at earlier entries.
func FuzzFlatten(f *testing.F) {
	f.Add(imagetest.Tar(f, dir("a"), reg("a/b", "x"), sym("l", "a")), imagetest.Tar(f, wh("a/b"), hard("c", "l"), reg("l/z", "z")))
	f.Add(imagetest.Tar(f, reg("x", "1"), hard("y", "x")), imagetest.Tar(f, dir("x"), opq("x")))
	f.Add(imagetest.Gzip(f, imagetest.Tar(f, sym("a", "/"), sym("b", "a/b"))), imagetest.Tar(f, reg("b/c", "c")))
	f.Add([]byte("not a tar"), []byte{})
	f.Fuzz(func(t *testing.T, l1, l2 []byte) {
		var ls []rootfs.Layer
		for _, b := range [][]byte{l1, l2} {
			blob := b
			ls = append(ls, rootfs.Layer{Open: func(context.Context) (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(blob)), nil }})
		}
		// The one-pass path must not panic either, whatever the input.
		rootfs.Stream(context.Background(), bytes.NewReader(l1), rootfs.Layer{}, tar.NewWriter(io.Discard),
			rootfs.Options{Limits: rootfs.Limits{MaxBytes: 1 << 20, MaxEntries: 1000}})
		var out bytes.Buffer
		slow := time.AfterFunc(5*time.Second, func() { panic("Flatten took more than 5s") })
		defer slow.Stop()
		_, err := rootfs.Flatten(context.Background(), ls, &out, rootfs.Options{Limits: rootfs.Limits{MaxBytes: 1 << 20, MaxEntries: 1000}})
		if err != nil {
			return
		}
		seen := map[string]bool{}
		tr := tar.NewReader(&out)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("output is not a tar: %v", err)
			}
			name := strings.TrimSuffix(h.Name, "/")
			if strings.HasPrefix(name, "/") || strings.Contains("/"+name+"/", "/../") {
				t.Fatalf("unclean name %q", h.Name)
			}
			if seen[name] && name != "." {
				t.Fatalf("%q written twice", name)
			}
			seen[name] = true
			if h.Typeflag == tar.TypeLink && !seen[h.Linkname] {
				t.Fatalf("hard link %q -> %q before its target", h.Name, h.Linkname)
			}
		}
	})
}

func FuzzUnmarshalTOC(f *testing.F) {
	toc, err := rootfs.BuildTOC(context.Background(), bytes.NewReader(imagetest.Tar(f, reg("a", "b"))), "", "", rootfs.Limits{})
	if err != nil {
		f.Fatal(err)
	}
	b, _ := toc.MarshalBinary()
	f.Add(b)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		toc, err := rootfs.UnmarshalTOC(data)
		if err != nil {
			return
		}
		// Whatever decodes must merge without panicking.
		rootfs.Merge([]*rootfs.TOC{toc}, rootfs.Limits{MaxEntries: 1000})
	})
}
