package rootfs_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/rootfs"
)

// StreamTo straight into an ext4.Writer (the converter's single-layer path) builds the same
// image, byte for byte, as Stream through a tar stream into ext4.WriteTar, once mtimes are
// rounded to the second as a tar stream without an explicit format carries them.
func TestStreamToMatchesStreamThroughTar(t *testing.T) {
	const uuid = "6b1f3c1e-2d4a-8e5f-9a0b-1c2d3e4f5a6b"
	cases := map[string]func(t *testing.T) []byte{
		"tricky": func(t *testing.T) []byte {
			return imagetest.Tar(t, dir("usr"), dir("usr/sbin"), sym("sbin", "usr/sbin"), reg("sbin/init", "init"),
				F{Name: "usr/bin/ping", Body: "ping", Mode: 0o4755, Xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}},
				hard("usr/bin/ping6", "usr/bin/ping"), reg("a", "1"), reg("a", "2"), wh("gone"), opq("usr"),
				reg("big", string(bytes.Repeat([]byte("x"), 700<<10))))
		},
		"debian": func(t *testing.T) []byte {
			imagetest.Heavy(t)
			b, err := os.ReadFile(imagetest.DebianRootfs(t))
			if err != nil {
				t.Fatal(err)
			}
			return b
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			layer := mk(t)
			dir := t.TempDir()
			viaTar := filepath.Join(dir, "tar.ext4")
			pr, pw := io.Pipe()
			go func() {
				tw := tar.NewWriter(pw)
				_, _, err := rootfs.Stream(context.Background(), bytes.NewReader(layer), rootfs.Layer{}, tw, rootfs.Options{})
				if err == nil {
					err = tw.Close()
				}
				pw.CloseWithError(err)
			}()
			if _, err := ext4.WriteTar(context.Background(), pr, viaTar, ext4.Options{UUID: uuid}); err != nil {
				t.Fatal(err)
			}
			direct := filepath.Join(dir, "direct.ext4")
			w, err := ext4.Create(context.Background(), direct, ext4.Options{UUID: uuid})
			if err != nil {
				t.Fatal(err)
			}
			_, _, err = rootfs.StreamTo(context.Background(), bytes.NewReader(layer), rootfs.Layer{}, func(hd *tar.Header, data io.Reader) error {
				hd.ModTime = hd.ModTime.Round(time.Second)
				return w.Add(hd, data)
			}, rootfs.Options{})
			if err != nil {
				w.Abort()
				t.Fatal(err)
			}
			if _, err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if a, b := fileSHA(t, viaTar), fileSHA(t, direct); a != b {
				t.Fatal("StreamTo into ext4.Writer and Stream through tar into WriteTar made different images")
			}
		})
	}
	if _, err := ext4.Create(context.Background(), filepath.Join(t.TempDir(), "x.ext4"), ext4.Options{}); err == nil {
		t.Error("ext4.Create without a UUID accepted")
	}
}

func fileSHA(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}
