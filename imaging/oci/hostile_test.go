package oci_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/imaging/rootfs"
)

// evilRegistry is an in-process registry whose blob responses pass through tamper while it is set.
type evilRegistry struct {
	host   string
	tamper atomic.Pointer[func(digest string, body []byte) []byte]
}

func newEvilRegistry(t *testing.T) *evilRegistry {
	e := &evilRegistry{}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tp := e.tamper.Load()
		if tp == nil || r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/sha256:") {
			inner.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		inner.ServeHTTP(rec, r)
		digest := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
		body := (*tp)(digest, rec.Body.Bytes())
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.Header().Del("Content-Length")
		w.WriteHeader(rec.Code)
		w.Write(body)
	}))
	t.Cleanup(s.Close)
	e.host = strings.TrimPrefix(s.URL, "http://")
	return e
}

func (e *evilRegistry) set(f func(digest string, body []byte) []byte) { e.tamper.Store(&f) }
func (e *evilRegistry) clear()                                        { e.tamper.Store(nil) }

// cached lists the layer blobs in a cache folder (not locks or temporaries).
func cached(t *testing.T, dir string) []string {
	var out []string
	ents, _ := os.ReadDir(filepath.Join(dir, "sha256"))
	for _, e := range ents {
		if n := e.Name(); !strings.HasPrefix(n, ".") && !strings.Contains(n, ".") {
			out = append(out, n)
		}
	}
	return out
}

func TestHostileBlobs(t *testing.T) {
	img := imagetest.Image(t, v1.Config{}, imagetest.Tar(t, reg("a", strings.Repeat("a", 5000))), imagetest.Tar(t, reg("b", "b")))
	layers, _ := img.Layers()
	victim, _ := layers[0].Digest()
	for _, tc := range []struct {
		name   string
		tamper func(body []byte) []byte
	}{
		{"truncated", func(b []byte) []byte { return b[:len(b)/2] }},
		{"longer", func(b []byte) []byte { return append(b, make([]byte, 100)...) }},
		{"same length, other bytes", func(b []byte) []byte {
			c := bytes.Clone(b)
			c[len(c)/2] ^= 0xff
			return c
		}},
		{"empty", func([]byte) []byte { return nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newEvilRegistry(t)
			ref := reg.host + "/victim:1"
			imagetest.Push(t, ref, img)
			reg.set(func(digest string, body []byte) []byte {
				if digest == victim.String() {
					return tc.tamper(body)
				}
				return body
			})
			cache := t.TempDir()
			_, err := oci.Pull(context.Background(), ref, io.Discard, oci.Options{Insecure: true, CacheDir: cache})
			if err == nil {
				t.Fatal("a tampered blob was accepted")
			}
			t.Logf("error: %v", err)
			for _, c := range cached(t, cache) {
				if strings.HasPrefix(victim.Hex, c[:12]) {
					t.Fatalf("tampered blob %s kept in the cache", c)
				}
			}
			// The registry heals; nothing poisoned stands in the way.
			reg.clear()
			if _, err := oci.Pull(context.Background(), ref, io.Discard, oci.Options{Insecure: true, CacheDir: cache}); err != nil {
				t.Fatalf("pull after the registry healed: %v", err)
			}
		})
	}
}

// A cached blob damaged on disk after it was verified is caught on the next read, evicted, and
// downloaded again on the next pull.
func TestCorruptCacheIsEvicted(t *testing.T) {
	img := imagetest.Image(t, v1.Config{}, imagetest.Tar(t, reg("a", strings.Repeat("x", 10000))))
	host := imagetest.Registry(t)
	ref := host + "/c:1"
	imagetest.Push(t, ref, img)
	cache := t.TempDir()
	o := oci.Options{Insecure: true, CacheDir: cache}
	if _, err := oci.Pull(context.Background(), ref, io.Discard, o); err != nil {
		t.Fatal(err)
	}
	blobs := cached(t, cache)
	if len(blobs) != 1 {
		t.Fatalf("cache holds %v", blobs)
	}
	p := filepath.Join(cache, "sha256", blobs[0])
	b, _ := os.ReadFile(p)
	b[len(b)-5] ^= 0x55
	os.WriteFile(p, b, 0o644)
	_, err := oci.Pull(context.Background(), ref, io.Discard, o)
	if err == nil {
		t.Fatal("a corrupt cached blob was used")
	}
	if _, err := oci.Pull(context.Background(), ref, io.Discard, o); err != nil {
		t.Fatalf("pull after eviction: %v", err)
	}
}

// Configs that lie about the layers are refused.
func TestLyingConfig(t *testing.T) {
	img := imagetest.Image(t, v1.Config{}, imagetest.Tar(t, reg("a", "a")), imagetest.Tar(t, reg("b", "b")))
	cf, _ := img.ConfigFile()
	host := imagetest.Registry(t)
	for _, tc := range []struct {
		name string
		edit func(*v1.ConfigFile)
		want string
	}{
		{"wrong diff_id", func(c *v1.ConfigFile) { c.RootFS.DiffIDs[1] = c.RootFS.DiffIDs[0] }, "diff_id"},
		{"missing diff_id", func(c *v1.ConfigFile) { c.RootFS.DiffIDs = c.RootFS.DiffIDs[:1] }, "1 diff_ids for 2 layers"},
		{"extra diff_id", func(c *v1.ConfigFile) { c.RootFS.DiffIDs = append(c.RootFS.DiffIDs, c.RootFS.DiffIDs[0]) }, "3 diff_ids for 2 layers"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cf.DeepCopy()
			tc.edit(c)
			bad, err := mutate.ConfigFile(img, c)
			if err != nil {
				t.Fatal(err)
			}
			ref := host + "/liar:" + strings.ReplaceAll(tc.name, " ", "-")
			imagetest.Push(t, ref, bad)
			_, err = oci.Pull(context.Background(), ref, io.Discard, oci.Options{Insecure: true, CacheDir: t.TempDir()})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// Layers that try to climb out of the root are refused; symlinks that point outside are resolved
// inside the image, so every output name is clean.
func TestEscapes(t *testing.T) {
	host := imagetest.Registry(t)
	for _, tc := range []struct {
		name string
		tar  []F
		want string
	}{
		{"dot-dot", []F{reg("../../../../tmp/pwned", "x")}, "path traversal"},
		{"dot-dot inside", []F{dir("a"), reg("a/../../etc/cron.d/x", "x")}, "path traversal"},
		{"hard link out", []F{hard("x", "../../../etc/shadow")}, "path traversal"},
		{"absolute hard link to nothing", []F{hard("x", "/etc/shadow")}, "does not exist"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ref := host + "/esc:" + strings.ReplaceAll(tc.name, " ", "-")
			imagetest.Push(t, ref, imagetest.Image(t, v1.Config{}, imagetest.Tar(t, tc.tar...)))
			_, err := oci.Pull(context.Background(), ref, io.Discard, oci.Options{Insecure: true})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
	ref := host + "/esc:symlinks"
	imagetest.Push(t, ref, imagetest.Image(t, v1.Config{},
		imagetest.Tar(t, sym("abs", "/"), sym("up", "../../../../../.."), sym("etc", "/host/etc")),
		imagetest.Tar(t, reg("abs/tmp/a", "a"), reg("up/tmp/b", "b"), reg("etc/passwd", "p"))))
	got := pull(t, ref, oci.Options{Insecure: true})
	for _, p := range []string{"tmp/a", "tmp/b", "host/etc/passwd"} {
		if got[p].Size != 1 {
			t.Errorf("%s: not written inside the image: %v", p, got[p])
		}
	}
	for p := range got {
		if strings.Contains(p, "..") || strings.HasPrefix(p, "/") {
			t.Errorf("unclean output name %q", p)
		}
	}
}

func TestZipBomb(t *testing.T) {
	// 256 MiB of zeros: a 256 KiB gzip layer. Under a 32 MiB limit it must stop early.
	bomb := imagetest.Tar(t, F{Name: "zeros", Body: string(make([]byte, 256<<20))})
	host := imagetest.Registry(t)
	ref := host + "/bomb:1"
	imagetest.Push(t, ref, imagetest.Image(t, v1.Config{}, bomb))
	cache := t.TempDir()
	_, err := oci.Pull(context.Background(), ref, io.Discard, oci.Options{Insecure: true, CacheDir: cache,
		Limits: rootfs.Limits{MaxBytes: 32 << 20}})
	if !errors.Is(err, rootfs.ErrLimit) {
		t.Fatalf("error %v, want ErrLimit", err)
	}
	// A sparse-file header declaring a huge size is caught by the declared-size bound too.
	lie := imagetest.Tar(t, F{Name: "huge", Body: "", Size: 1 << 40})
	ref = host + "/bomb:2"
	imagetest.Push(t, ref, imagetest.Image(t, v1.Config{}, lie))
	_, err = oci.Pull(context.Background(), ref, io.Discard, oci.Options{Insecure: true})
	if err == nil {
		t.Fatal("a header declaring 1 TiB with no data was accepted")
	}
}
