package oci_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/oci"
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

// tricky is an image exercising everything a flattener gets wrong: whiteouts, opaque directories,
// files replaced by directories and back, hard links across layers (with the target later
// deleted), symlinked directories, setuid bits, owners and xattrs.
func tricky(t testing.TB) v1.Image {
	return imagetest.Image(t, v1.Config{
		Entrypoint: []string{"/bin/app"}, Cmd: []string{"--serve"}, Env: []string{"PATH=/usr/bin:/bin", "A=b"},
		WorkingDir: "/srv", User: "1000:1000", ExposedPorts: map[string]struct{}{"8080/tcp": {}, "53/udp": {}},
		Labels: map[string]string{"org.example": "yes"},
	},
		imagetest.Tar(t, dir("bin"), reg("bin/busybox", "busybox binary"), reg("bin/old", "old"),
			dir("usr"), dir("usr/lib"), reg("usr/lib/libc.so", "libc"), sym("lib", "usr/lib"),
			dir("etc"), reg("etc/passwd", "root:x:0:0"), reg("etc/shadow", "secret"),
			dir("var"), dir("var/cache"), reg("var/cache/a", "a"), dir("var/cache/sub"), reg("var/cache/sub/b", "b"),
			reg("p", "file"), dir("q"), reg("q/x", "x"),
			F{Name: "bin/su", Body: "su", Mode: 0o4755, UID: 0, GID: 0}, F{Name: "srv/", Type: '5', Mode: 0o750, UID: 1000, GID: 1000}),
		imagetest.Tar(t, hard("bin/sh", "bin/busybox"), hard("bin/ls", "bin/busybox"), hard("bin/keep", "bin/old"),
			wh("etc/shadow"), dir("var/cache"), opq("var/cache"), reg("var/cache/new", "new"),
			dir("p"), reg("p/inside", "inside"), reg("q", "q is a file now"), reg("lib/libm.so", "libm")),
		imagetest.Tar(t, wh("bin/old"), wh("bin/busybox"), hard("bin/cat", "bin/sh"),
			reg("p", "p is a file again"), reg("bin/app", "app")),
	)
}

var trickyWant = []string{"bin/sh", "bin/ls", "bin/cat", "bin/keep", "var/cache/new", "p", "q", "usr/lib/libm.so", "bin/su", "srv"}

func pull(t *testing.T, ref string, o oci.Options) map[string]imagetest.Meta {
	t.Helper()
	var out bytes.Buffer
	if _, err := oci.Pull(context.Background(), ref, &out, o); err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	return imagetest.ReadTar(t, &out)
}

func compare(t *testing.T, want, got map[string]imagetest.Meta) {
	t.Helper()
	delete(want, ".")
	delete(got, ".")
	if d := imagetest.Diff(want, got); len(d) > 0 {
		if len(d) > 40 {
			d = append(d[:40], "…")
		}
		t.Errorf("%d differences (want = umoci, got = ours):\n%s", len(d), strings.Join(d, "\n"))
	}
}

// Pulling from a registry gives file for file what skopeo + umoci unpack give.
func TestPullMatchesUmoci(t *testing.T) {
	host := imagetest.Registry(t)
	ref := host + "/tricky:v1"
	imagetest.Push(t, ref, tricky(t))
	got := pull(t, "docker://"+ref, oci.Options{Insecure: true, CacheDir: t.TempDir()})
	for _, p := range trickyWant {
		if _, ok := got[p]; !ok {
			t.Errorf("%s missing from the flattened tree", p)
		}
	}
	for _, p := range []string{"bin/old", "bin/busybox", "etc/shadow", "var/cache/a", "var/cache/sub", "q/x", "p/inside"} {
		if _, ok := got[p]; ok {
			t.Errorf("%s should have been deleted", p)
		}
	}
	compare(t, imagetest.ReadDir(t, imagetest.Umoci(t, ref)), got)
}

func TestPullSources(t *testing.T) {
	img := tricky(t)
	want := pull(t, "tar:"+writeFile(t, mustPull(t, img)), oci.Options{})

	host := imagetest.Registry(t)
	imagetest.Push(t, host+"/x:latest", img)
	d, _ := img.Digest()

	lay := filepath.Join(t.TempDir(), "layout")
	lp, err := layout.Write(lay, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "v1"})); err != nil {
		t.Fatal(err)
	}
	arch := filepath.Join(t.TempDir(), "saved.tar")
	tag, _ := name.NewTag("example.com/x:v1")
	if err := tarball.WriteToFile(arch, tag, img); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{
		"docker://" + host + "/x:latest",
		host + "/x:latest",
		host + "/x@" + d.String(),
		"oci:" + lay + ":v1",
		"oci:" + lay,
		"docker-archive:" + arch,
		"docker-archive:" + arch + ":example.com/x:v1",
	} {
		t.Run(ref, func(t *testing.T) {
			compare(t, want, pull(t, ref, oci.Options{Insecure: true}))
		})
	}
}

// mustPull flattens img through an OCI layout, for use as a tar: source.
func mustPull(t *testing.T, img v1.Image) []byte {
	lay := filepath.Join(t.TempDir(), "l")
	lp, err := layout.Write(lay, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if _, err := oci.Pull(context.Background(), "oci:"+lay, &out, oci.Options{}); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func writeFile(t *testing.T, b []byte) string {
	p := filepath.Join(t.TempDir(), "rootfs.tar")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPullPlatform(t *testing.T) {
	amd := imagetest.Image(t, v1.Config{}, imagetest.Tar(t, reg("arch", "amd64")))
	arm := imagetest.WithPlatform(t, imagetest.Image(t, v1.Config{}, imagetest.Tar(t, reg("arch", "arm64"))), "linux", "arm64")
	host := imagetest.Registry(t)
	// arm64 first, so that "the first manifest" would be the wrong answer.
	idx := imagetest.Index(t, arm, amd)
	imagetest.Push(t, host+"/multi:latest", idx)
	armDigest, _ := arm.Digest()
	idxDigest, _ := idx.Digest()
	for _, tc := range []struct{ ref, platform, want string }{
		{host + "/multi:latest", "", "amd64"},
		{host + "/multi:latest", "linux/arm64", "arm64"},
		{host + "/multi@" + idxDigest.String(), "linux/arm64", "arm64"},
		// A digest naming one platform's manifest is honoured whatever the platform option.
		{host + "/multi@" + armDigest.String(), "", "arm64"},
	} {
		got := pull(t, tc.ref, oci.Options{Insecure: true, Platform: tc.platform})
		if want := imagetest.Reg("arch", tc.want); got["arch"].Size != int64(len(want.Body)) || got["arch"].Digest != strings.TrimPrefix(imagetest.Digest([]byte(want.Body)), "sha256:") {
			t.Errorf("%s (%s): got %v, want the %s image", tc.ref, tc.platform, got["arch"], tc.want)
		}
	}
	var out bytes.Buffer
	_, err := oci.Pull(context.Background(), host+"/multi:latest", &out, oci.Options{Insecure: true, Platform: "linux/s390x"})
	if err == nil || !strings.Contains(err.Error(), "linux/amd64, linux/arm64") {
		t.Errorf("missing platform: error %v, want one listing the platforms", err)
	}
}

func TestParseSource(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"debian", "docker://index.docker.io/library/debian:latest"},
		{"docker://localhost:5000/a/b:c", "docker://localhost:5000/a/b:c"},
		{"localhost:5000/a", "docker://localhost:5000/a:latest"},
		{"oci:/x/y:tag", "oci:/x/y:tag"},
		{"oci:/x/y", "oci:/x/y"},
		{"docker-archive:/a.tar:repo/x:1", "docker-archive:/a.tar:repo/x:1"},
		{"tar:/r.tar", "tar:/r.tar"},
	} {
		s, err := oci.ParseSource(tc.in, false)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		if s.String() != tc.want {
			t.Errorf("%s: got %s, want %s", tc.in, s, tc.want)
		}
	}
	for _, bad := range []string{"", "http://x/y", "docker:x", "dir:/x", "oci:", "UPPER/case", "a@sha256:12"} {
		if _, err := oci.ParseSource(bad, false); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// debian is a realistic image: a debootstrap'd Debian as the base layer and a second layer that
// deletes, replaces and hard-links like a package upgrade would.
func debian(t testing.TB) v1.Image {
	base, err := os.ReadFile(imagetest.DebianRootfs(t))
	if err != nil {
		t.Fatal(err)
	}
	return imagetest.Image(t, v1.Config{Cmd: []string{"/bin/bash"}, Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}},
		base,
		imagetest.Tar(t, dir("usr/share/doc"), opq("usr/share/doc"), reg("usr/share/doc/README", "docs removed"),
			wh("etc/motd"), hard("usr/bin/bash-again", "usr/bin/bash"), reg("bin/extra", "through the usrmerge symlink"),
			dir("var/log"), reg("var/log/new.log", "log")))
}

func TestPullDebianMatchesUmoci(t *testing.T) {
	imagetest.Heavy(t)
	host := imagetest.Registry(t)
	ref := host + "/debian:bookworm"
	imagetest.Push(t, ref, debian(t))
	got := pull(t, ref, oci.Options{Insecure: true, CacheDir: t.TempDir()})
	if len(got) < 5000 {
		t.Fatalf("only %d paths in the flattened Debian", len(got))
	}
	if got["usr/bin/extra"].Size == 0 || got["usr/bin/bash-again"] != got["usr/bin/bash"] {
		t.Errorf("usrmerge write or cross-layer hard link lost: %v %v", got["usr/bin/extra"], got["usr/bin/bash-again"])
	}
	compare(t, imagetest.ReadDir(t, imagetest.Umoci(t, ref)), got)
}
