// Package convert benchmarks image conversion; run.sh compares it with skopeo + umoci + mke2fs.
package convert

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/oci"
)

func debianRef(b *testing.B) string {
	base, err := os.ReadFile(imagetest.DebianRootfs(b))
	if err != nil {
		b.Fatal(err)
	}
	host := imagetest.Registry(b)
	ref := host + "/debian:bookworm"
	imagetest.Push(b, ref, imagetest.Image(b, v1.Config{Cmd: []string{"/bin/bash"}}, base))
	return ref
}

func options(b *testing.B, dir string) oci.ConvertOptions {
	return oci.ConvertOptions{
		Options: oci.Options{Insecure: true, CacheDir: filepath.Join(dir, "cache")},
		Store:   filepath.Join(dir, "images"),
		Agent:   cmdtest.Binary(b, "virtkit-agent"),
	}
}

// BenchmarkConvertCold converts a Debian image from a local registry with empty caches.
func BenchmarkConvertCold(b *testing.B) {
	ref := debianRef(b)
	o := options(b, b.TempDir())
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		dir := b.TempDir()
		o := options(b, dir)
		b.StartTimer()
		if _, err := oci.Convert(context.Background(), ref, o); err != nil {
			b.Fatal(err)
		}
	}
	_ = o
}

// BenchmarkConvertColdTwoLayers converts Debian plus a small second layer (the two-pass
// flattener: a first pass for the tables of contents while downloading, a second that writes).
func BenchmarkConvertColdTwoLayers(b *testing.B) {
	base, err := os.ReadFile(imagetest.DebianRootfs(b))
	if err != nil {
		b.Fatal(err)
	}
	ref := imagetest.Registry(b) + "/debian:two"
	top := imagetest.Tar(b, imagetest.Reg("etc/motd", "two layers"), imagetest.Whiteout("etc/issue"))
	imagetest.Push(b, ref, imagetest.Image(b, v1.Config{Cmd: []string{"/bin/bash"}}, base, top))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		o := options(b, b.TempDir())
		b.StartTimer()
		if _, err := oci.Convert(context.Background(), ref, o); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkConvertWarm converts an image whose bundle exists: a cache hit.
func BenchmarkConvertWarm(b *testing.B) {
	ref := debianRef(b)
	o := options(b, b.TempDir())
	if _, err := oci.Convert(context.Background(), ref, o); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := oci.Convert(context.Background(), ref, o); err != nil {
			b.Fatal(err)
		}
	}
}
