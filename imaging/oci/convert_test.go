package oci_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/imaging/store"
)

// countingRegistry is an in-process registry that counts the requests it serves.
type countingRegistry struct {
	host string
	n    atomic.Int64
}

func newCountingRegistry(t testing.TB) *countingRegistry {
	c := &countingRegistry{}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.n.Add(1)
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(s.Close)
	c.host = strings.TrimPrefix(s.URL, "http://")
	return c
}

func convertOptions(t testing.TB) oci.ConvertOptions {
	dir := t.TempDir()
	return oci.ConvertOptions{
		Options: oci.Options{Insecure: true, CacheDir: filepath.Join(dir, "cache")},
		Store:   filepath.Join(dir, "images"),
		Agent:   cmdtest.Binary(t, "virtkit-agent"),
	}
}

// rdump reads an ext4 image back into a folder with debugfs, after e2fsck -fn says it is clean.
func rdump(t *testing.T, img string) string {
	t.Helper()
	if b, err := exec.Command(cmdtest.Tool(t, "e2fsck"), "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img, err, b)
	}
	out := t.TempDir()
	if b, err := exec.Command(cmdtest.Tool(t, "debugfs"), "-R", "rdump / "+out, img).CombinedOutput(); err != nil {
		t.Fatalf("debugfs rdump: %v\n%s", err, b)
	}
	return out
}

// The bundle's ext4 holds, file for file, what skopeo + umoci produce, plus the agent and the
// image config; image.json carries the config.
func TestConvertMatchesUmoci(t *testing.T) {
	cmdtest.RequireRoot(t) // debugfs rdump restores owners
	host := imagetest.Registry(t)
	ref := host + "/tricky:v1"
	imagetest.Push(t, ref, tricky(t))
	o := convertOptions(t)
	b, built, err := oci.ConvertStatus(context.Background(), ref, o)
	if err != nil {
		t.Fatal(err)
	}
	if !built || b.Rootfs != filepath.Join(b.Dir, "rootfs.ext4") || filepath.Dir(b.Dir) != o.Store {
		t.Fatalf("bundle %+v built=%v", b, built)
	}
	// The multi-layer path spools layers into the build folder: nothing of it is published.
	ents, _ := os.ReadDir(b.Dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "fsuuid image.json rootfs.ext4 used" {
		t.Errorf("bundle folder holds %v", names)
	}
	c := b.Image
	if strings.Join(c.Entrypoint, " ") != "/bin/app" || strings.Join(c.Cmd, " ") != "--serve" || c.WorkingDir != "/srv" ||
		c.User != "1000:1000" || strings.Join(c.ExposedPorts, ",") != "53/udp,8080/tcp" || c.Labels["org.example"] != "yes" ||
		len(c.Env) != 2 || c.Source != ref || !strings.HasPrefix(c.ManifestDigest, "sha256:") || c.Platform != "linux/amd64" {
		t.Errorf("image config %+v", c)
	}
	root := filepath.Join(rdump(t, b.Rootfs), "")
	got := imagetest.ReadDir(t, root)
	agent := got["sbin/virtkit-agent"]
	inImage, err := os.ReadFile(filepath.Join(root, ".virtkit", "image.json"))
	if err != nil {
		t.Fatal(err)
	}
	beside, _ := os.ReadFile(filepath.Join(b.Dir, "image.json"))
	if string(inImage) != string(beside) {
		t.Errorf("/.virtkit/image.json differs from the bundle's image.json:\n%s\n%s", inImage, beside)
	}
	if agent.Mode != 0o755 || agent.Size == 0 {
		t.Errorf("agent %v", agent)
	}
	for _, p := range []string{"sbin", "sbin/virtkit-agent", ".virtkit", ".virtkit/image.json", "lost+found"} {
		delete(got, p)
	}
	want := imagetest.ReadDir(t, imagetest.Umoci(t, ref))
	specialModes(t, b.Rootfs, want, got)
	compare(t, want, got)
}

// specialModes takes what debugfs rdump cannot restore from the image itself, with debugfs stat:
// devices and fifos (rdump skips them) and setuid, setgid and sticky bits (it chowns after its
// chmod, which clears them).
func specialModes(t *testing.T, img string, want, got map[string]imagetest.Meta) {
	var paths []string
	for p, w := range want {
		if w.Mode&0o7000 != 0 || w.Type == '3' || w.Type == '4' || w.Type == '6' {
			paths = append(paths, p)
		}
	}
	if len(paths) == 0 {
		return
	}
	cmds := filepath.Join(t.TempDir(), "cmds")
	var sb strings.Builder
	for _, p := range paths {
		fmt.Fprintf(&sb, "stat /%s\n", p)
	}
	os.WriteFile(cmds, []byte(sb.String()), 0o644)
	out, err := exec.Command(cmdtest.Tool(t, "debugfs"), "-f", cmds, img).Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, block := range strings.Split(string(out), "debugfs: stat /")[1:] {
		p, body, _ := strings.Cut(block, "\n")
		if strings.Contains(body, "File not found") {
			continue
		}
		m := got[p]
		var uid, gid int
		if i := strings.Index(body, "User:"); i >= 0 {
			fmt.Sscanf(body[i:], "User: %d Group: %d", &uid, &gid)
		}
		m.UID, m.GID = uid, gid
		if i := strings.Index(body, "Mode:"); i >= 0 {
			fmt.Sscanf(strings.TrimSpace(body[i+5:]), "%o", &m.Mode)
			m.Mode &= 0o7777
		}
		switch {
		case strings.Contains(body, "Type: character special"):
			m.Type = '3'
		case strings.Contains(body, "Type: block special"):
			m.Type = '4'
		case strings.Contains(body, "Type: FIFO"):
			m.Type = '6'
		}
		if i := strings.Index(body, "Device major/minor number:"); i >= 0 {
			var maj, min int
			fmt.Sscanf(body[i+len("Device major/minor number:"):], " %d:%d", &maj, &min)
			m.Dev = fmt.Sprintf("%d,%d", maj, min)
		}
		got[p] = m
	}
}

// A second conversion is a cache hit that reads no layer and, for a digest or a known tag, does
// not touch the network; concurrent conversions build once.
func TestConvertCache(t *testing.T) {
	reg := newCountingRegistry(t)
	ref := reg.host + "/img:1"
	img := tricky(t)
	imagetest.Push(t, ref, img)
	d, _ := img.Digest()
	o := convertOptions(t)

	// Concurrent first conversions: one builds, the others wait and share the result.
	var wg sync.WaitGroup
	var builds atomic.Int32
	fps := make([]string, 4)
	for i := range fps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, built, err := oci.ConvertStatus(context.Background(), ref, o)
			if err != nil {
				t.Error(err)
				return
			}
			if built {
				builds.Add(1)
			}
			fps[i] = b.Fingerprint
		}()
	}
	wg.Wait()
	if builds.Load() != 1 {
		t.Errorf("%d builds for 4 concurrent conversions, want 1", builds.Load())
	}
	for _, fp := range fps[1:] {
		if fp != fps[0] {
			t.Errorf("fingerprints differ: %v", fps)
		}
	}

	for _, tc := range []struct {
		ref, pull   string
		maxRequests int64
	}{
		{ref, "", 0},
		{ref, oci.PullNever, 0},
		{ref, oci.PullAlways, 2}, // ping + HEAD
		{reg.host + "/img@" + d.String(), oci.PullAlways, 0},
	} {
		// The digest reference was never seen: the first time resolves, the second is offline.
		for range 2 {
			before := reg.n.Load()
			oo := o
			oo.Pull = tc.pull
			b, built, err := oci.ConvertStatus(context.Background(), tc.ref, oo)
			if err != nil {
				t.Fatalf("%s (%s): %v", tc.ref, tc.pull, err)
			}
			if built || b.Fingerprint != fps[0] {
				t.Errorf("%s (%s): built=%v fingerprint %s, want a hit on %s", tc.ref, tc.pull, built, b.Fingerprint, fps[0])
			}
			n := reg.n.Load() - before
			if n <= tc.maxRequests {
				break
			}
			t.Logf("%s (%s): %d registry requests", tc.ref, tc.pull, n)
		}
	}
	if n := reg.n.Load(); n > 0 {
		before := n
		if _, err := oci.Convert(context.Background(), reg.host+"/img@"+d.String(), o); err != nil {
			t.Fatal(err)
		}
		if got := reg.n.Load() - before; got != 0 {
			t.Errorf("a known digest reference made %d registry requests, want 0", got)
		}
	}

	// Other options make another bundle.
	oo := o
	oo.NoJournal = true
	b, built, err := oci.ConvertStatus(context.Background(), ref, oo)
	if err != nil || !built || b.Fingerprint == fps[0] {
		t.Errorf("no-journal conversion: built=%v err=%v", built, err)
	}

	// Pull never on an unknown tag fails clearly.
	oo = o
	oo.Pull = oci.PullNever
	if _, err := oci.Convert(context.Background(), reg.host+"/other:1", oo); !errors.Is(err, oci.ErrNotPresent) {
		t.Errorf("pull never, unknown tag: error %v", err)
	}
	// ... but local sources are always there to read.
	lay := filepath.Join(t.TempDir(), "layout")
	lp, _ := layout.Write(lay, empty.Index)
	if err := lp.AppendImage(img); err != nil {
		t.Fatal(err)
	}
	if b, err := oci.Convert(context.Background(), "oci:"+lay, oo); err != nil || b.Fingerprint != fps[0] {
		t.Errorf("pull never, oci layout: %v (same image, so the same bundle: %v)", err, b)
	}

	// The store lists both bundles and prunes to the most recent one.
	st, _ := store.Open(o.Store)
	list, err := st.List()
	if err != nil || len(list) != 2 {
		t.Fatalf("list: %v %v", list, err)
	}
	removed, err := st.Prune(context.Background(), 1)
	if err != nil || len(removed) != 1 {
		t.Fatalf("prune: %v %v", removed, err)
	}
	if list, _ := st.List(); len(list) != 1 {
		t.Errorf("after prune: %d bundles", len(list))
	}
}

// A failed conversion leaves no bundle and no temporary folder behind.
func TestConvertFailureLeavesNothing(t *testing.T) {
	host := imagetest.Registry(t)
	ref := host + "/bad:1"
	imagetest.Push(t, ref, imagetest.Image(t, v1.Config{}, imagetest.Tar(t, reg("ok", "fine")), imagetest.Tar(t, reg("../escape", "x"))))
	o := convertOptions(t)
	if _, err := oci.Convert(context.Background(), ref, o); err == nil || !strings.Contains(err.Error(), "path traversal") {
		t.Fatalf("error %v, want path traversal", err)
	}
	ents, _ := os.ReadDir(o.Store)
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".") {
			t.Errorf("left behind: %s", e.Name())
		}
	}
	if tmp, _ := os.ReadDir(filepath.Join(o.Store, ".tmp")); len(tmp) > 0 {
		t.Errorf("temporary folders left: %v", tmp)
	}
}

// The realistic case: a Debian image converts to an ext4 that e2fsck passes and that holds, file
// for file, what skopeo + umoci unpack give.
func TestConvertDebianMatchesUmoci(t *testing.T) {
	imagetest.Heavy(t)
	cmdtest.RequireRoot(t)
	host := imagetest.Registry(t)
	ref := host + "/debian:bookworm"
	imagetest.Push(t, ref, debian(t))
	o := convertOptions(t)
	b, err := oci.Convert(context.Background(), ref, o)
	if err != nil {
		t.Fatal(err)
	}
	got := imagetest.ReadDir(t, rdump(t, b.Rootfs))
	// Debian is usrmerged: /sbin is a symlink that must survive, the agent lands behind it.
	if got["sbin"].Link != "usr/sbin" || got["usr/sbin/virtkit-agent"].Mode != 0o755 {
		t.Errorf("sbin %v, usr/sbin/virtkit-agent %v", got["sbin"], got["usr/sbin/virtkit-agent"])
	}
	for _, p := range []string{"usr/sbin/virtkit-agent", ".virtkit", ".virtkit/image.json", "lost+found"} {
		delete(got, p)
	}
	want := imagetest.ReadDir(t, imagetest.Umoci(t, ref))
	specialModes(t, b.Rootfs, want, got)
	compare(t, want, got)
}

// squash is the tricky image's content in one layer, with the hazards one layer can have:
// duplicates, a hard link whose target is rewritten, a symlinked parent, implicit parents.
func squash(t testing.TB) v1.Image {
	return imagetest.Image(t, v1.Config{Cmd: []string{"/bin/sh"}}, imagetest.Tar(t,
		dir("usr"), dir("usr/sbin"), sym("sbin", "usr/sbin"), reg("sbin/init", "init"),
		dir("bin"), reg("bin/busybox", "bb"), hard("bin/sh", "bin/busybox"), reg("bin/busybox", "bb2"),
		reg("etc/passwd", "one"), reg("etc/passwd", "two"), dir("q"), reg("q/x", "x"), reg("q", "file"),
		F{Name: "bin/su", Body: "su", Mode: 0o4755}, F{Name: "tmp/", Type: '5', Mode: 0o1777},
		F{Name: "dev/null", Type: '3', Mode: 0o666}, wh("etc/ignored")))
}

// Single-layer images take the one-pass path; the result is the same as the two-pass path and
// as umoci's, with the agent behind the /sbin symlink.
func TestConvertSingleLayer(t *testing.T) {
	cmdtest.RequireRoot(t)
	host := imagetest.Registry(t)
	ref := host + "/squash:1"
	imagetest.Push(t, ref, squash(t))
	want := imagetest.ReadDir(t, imagetest.Umoci(t, ref))
	for _, twoPass := range []bool{false, true} {
		o := convertOptions(t)
		o.TwoPass = twoPass
		b, err := oci.Convert(context.Background(), ref, o)
		if err != nil {
			t.Fatal(err)
		}
		// The filesystem is named by the bundle fingerprint (no second hash of the content).
		if u := strings.ReplaceAll(b.FSUUID, "-", ""); len(u) != 32 || u[:12] != b.Fingerprint[:12] ||
			!strings.Contains(ext4test.Dumpe2fs(t, b.Rootfs), b.FSUUID) {
			t.Errorf("two-pass %v: filesystem UUID %q, fingerprint %s", twoPass, b.FSUUID, b.Fingerprint)
		}
		got := imagetest.ReadDir(t, rdump(t, b.Rootfs))
		if got["sbin"].Link != "usr/sbin" || got["usr/sbin/virtkit-agent"].Mode != 0o755 || got[".virtkit/image.json"].Size == 0 {
			t.Errorf("two-pass %v: sbin %v, agent %v", twoPass, got["sbin"], got["usr/sbin/virtkit-agent"])
		}
		for _, p := range []string{"usr/sbin/virtkit-agent", ".virtkit", ".virtkit/image.json", "lost+found"} {
			delete(got, p)
		}
		w := maps.Clone(want)
		specialModes(t, b.Rootfs, w, got)
		compare(t, w, got)
		// The layer and its TOC are cached: a conversion with other options reads no registry blob.
		if !twoPass {
			ents, _ := os.ReadDir(filepath.Join(o.CacheDir, "sha256"))
			var tocs int
			for _, e := range ents {
				if strings.HasSuffix(e.Name(), ".toc") {
					tocs++
				}
			}
			if tocs != 1 {
				t.Errorf("%d TOCs cached after a streamed conversion", tocs)
			}
		}
	}
}

// A tampered single-layer blob fails the streamed conversion and is not cached.
func TestConvertSingleLayerTampered(t *testing.T) {
	img := imagetest.Image(t, v1.Config{}, imagetest.Tar(t, reg("a", strings.Repeat("a", 50000))))
	layers, _ := img.Layers()
	victim, _ := layers[0].Digest()
	reg := newEvilRegistry(t)
	ref := reg.host + "/v:1"
	imagetest.Push(t, ref, img)
	o := convertOptions(t)
	for _, tamper := range []func([]byte) []byte{
		func(b []byte) []byte { return b[:len(b)-10] },
		func(b []byte) []byte { c := bytes.Clone(b); c[len(c)/2] ^= 1; return c },
	} {
		reg.set(func(d string, b []byte) []byte {
			if d == victim.String() {
				return tamper(b)
			}
			return b
		})
		if _, err := oci.Convert(context.Background(), ref, o); err == nil {
			t.Fatal("tampered layer converted")
		}
		if c := cached(t, o.CacheDir); len(c) != 0 {
			t.Fatalf("cache holds %v", c)
		}
		if st, _ := store.Open(o.Store); st != nil {
			if l, _ := st.List(); len(l) != 0 {
				t.Fatalf("bundles after a failure: %v", l)
			}
		}
	}
	reg.clear()
	if _, err := oci.Convert(context.Background(), ref, o); err != nil {
		t.Fatalf("after the registry healed: %v", err)
	}
}

// The one-pass path on a real distribution: a single-layer Debian.
func TestConvertDebianSingleLayerMatchesUmoci(t *testing.T) {
	imagetest.Heavy(t)
	cmdtest.RequireRoot(t)
	base, err := os.ReadFile(imagetest.DebianRootfs(t))
	if err != nil {
		t.Fatal(err)
	}
	host := imagetest.Registry(t)
	ref := host + "/debian:single"
	imagetest.Push(t, ref, imagetest.Image(t, v1.Config{Cmd: []string{"/bin/bash"}}, base))
	b, err := oci.Convert(context.Background(), ref, convertOptions(t))
	if err != nil {
		t.Fatal(err)
	}
	got := imagetest.ReadDir(t, rdump(t, b.Rootfs))
	if got["sbin"].Link != "usr/sbin" || got["usr/sbin/virtkit-agent"].Mode != 0o755 {
		t.Errorf("sbin %v, usr/sbin/virtkit-agent %v", got["sbin"], got["usr/sbin/virtkit-agent"])
	}
	for _, p := range []string{"usr/sbin/virtkit-agent", ".virtkit", ".virtkit/image.json", "lost+found"} {
		delete(got, p)
	}
	want := imagetest.ReadDir(t, imagetest.Umoci(t, ref))
	specialModes(t, b.Rootfs, want, got)
	compare(t, want, got)
}
