package oci_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/imaging/rootfs"
)

func FuzzParseSource(f *testing.F) {
	for _, s := range []string{"debian", "docker://localhost:5000/a/b:c@sha256:" + strings.Repeat("a", 64), "oci:/x:y", "docker-archive:/a:b/c:d",
		"tar:r.tar", "http://x", "oci:", "a@sha256:1", "UPPER"} {
		f.Add(s, false)
	}
	f.Fuzz(func(t *testing.T, s string, insecure bool) {
		src, err := oci.ParseSource(s, insecure)
		if err != nil {
			return
		}
		// The canonical form parses to the same source.
		again, err := oci.ParseSource(src.String(), insecure)
		if err != nil || again != src {
			t.Fatalf("%q -> %q -> %+v, %v", s, src.String(), again, err)
		}
	})
}

// fuzzLayout writes an OCI layout whose image has the given manifest and config bytes (the
// manifest names its own blobs as it likes) and returns its path.
func fuzzLayout(t *testing.T, base string, manifest []byte) string {
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS(base)); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(manifest)
	h := hex.EncodeToString(sum[:])
	if err := os.WriteFile(filepath.Join(dir, "blobs", "sha256", h), manifest, 0o644); err != nil {
		t.Fatal(err)
	}
	idx, _ := json.Marshal(map[string]any{"schemaVersion": 2, "manifests": []map[string]any{{
		"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + h, "size": len(manifest)}}})
	if err := os.WriteFile(filepath.Join(dir, "index.json"), idx, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// baseLayout is a valid layout of the tricky image, whose blobs fuzzed manifests may name; its
// config is also returned, for FuzzConfig to mutate.
func baseLayout(f *testing.F) (string, []byte, []byte) {
	dir := f.TempDir()
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		f.Fatal(err)
	}
	img := tricky(f)
	if err := lp.AppendImage(img); err != nil {
		f.Fatal(err)
	}
	m, _ := img.RawManifest()
	c, _ := img.RawConfigFile()
	return dir, m, c
}

// FuzzManifest feeds arbitrary manifests through the whole pull: parse, config and layer checks,
// flattening. Nothing may panic; a manifest that passes must produce a readable tar.
func FuzzManifest(f *testing.F) {
	base, m, _ := baseLayout(f)
	f.Add(m)
	f.Add([]byte(`{"schemaVersion":2,"config":{"digest":"sha256:00","size":-1},"layers":[{"size":1e99}]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, manifest []byte) {
		dir := fuzzLayout(t, base, manifest)
		var out bytes.Buffer
		o := oci.Options{Limits: rootfs.Limits{MaxBytes: 1 << 20, MaxEntries: 1000}}
		if _, err := oci.Pull(context.Background(), "oci:"+dir, &out, o); err == nil {
			imagetest.ReadTar(t, &out)
		}
	})
}

// FuzzConfig feeds arbitrary image configs (with a manifest that names them correctly).
func FuzzConfig(f *testing.F) {
	base, m, c := baseLayout(f)
	f.Add(c)
	f.Add([]byte(`{"rootfs":{"diff_ids":["sha256:zz"]},"config":{"ExposedPorts":{"80/tcp":{}}}}`))
	f.Add([]byte(`null`))
	var man v1.Manifest
	if err := json.Unmarshal(m, &man); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, cfg []byte) {
		sum := sha256.Sum256(cfg)
		mm := man
		mm.Config.Digest = v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
		mm.Config.Size = int64(len(cfg))
		mb, _ := json.Marshal(mm)
		dir := fuzzLayout(t, base, mb)
		os.WriteFile(filepath.Join(dir, "blobs", "sha256", mm.Config.Digest.Hex), cfg, 0o644)
		o := oci.Options{Limits: rootfs.Limits{MaxBytes: 1 << 20, MaxEntries: 1000}}
		oci.Pull(context.Background(), "oci:"+dir, io.Discard, o)
	})
}
