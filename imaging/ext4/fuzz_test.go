package ext4_test

import (
	"archive/tar"
	"bytes"
	"context"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"

	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

// FuzzWriteTar feeds arbitrary bytes to the tar→ext4 path: every input either fails with an
// error and leaves no file, or gives an image e2fsck accepts.
func FuzzWriteTar(f *testing.F) {
	f.Add(smallTree(f))
	f.Add(rawTar(f))
	f.Add(mkTar(f, []entry{
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "l", Linkname: "t"}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "t", Mode: 0o755}, data: []byte("x")},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "s", Linkname: strings.Repeat("s", 80)}},
		{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/c", Devmajor: 4, Devminor: 300}},
		{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "p"}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "../x", PAXRecords: map[string]string{"SCHILY.xattr.user.a": "b"}}},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "t/"}},
	}))
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	w.Write(rawTar(f))
	w.Close()
	f.Add(gz.Bytes())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		dir := t.TempDir()
		img := filepath.Join(dir, "out.ext4")
		done := make(chan error, 1)
		go func() {
			_, err := ext4.WriteTar(context.Background(), bytes.NewReader(in), img, ext4.Options{Size: 64 << 20, NoJournal: true})
			done <- err
		}()
		var err error
		select {
		case err = <-done:
		case <-time.After(20 * time.Second):
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("WriteTar hangs on %q:\n%s", in, buf[:n])
		}
		if err != nil {
			assertNoOutput(t, dir)
			return
		}
		ext4test.Fsck(t, img)
	})
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"8G", "512M", "1.5g", "4096", "2TiB", "", "-1", "1e30", "G"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ext4.ParseSize(s)
		if err == nil && v < 0 {
			t.Fatalf("ParseSize(%q) = %d", s, v)
		}
	})
}

func FuzzParseInject(f *testing.F) {
	for _, s := range []string{"a:/b:0755", "a:b", "a:b:4755", "a", "a:b:c:d", ":b", "a:b:99"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		in, err := ext4.ParseInject(s)
		if err == nil && (in.Src == "" || in.Dst == "") {
			t.Fatalf("ParseInject(%q) = %+v", s, in)
		}
	})
}
