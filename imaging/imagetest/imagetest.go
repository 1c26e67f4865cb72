// Package imagetest builds container images for imaging tests: tar layers described as data, images
// pushed to an in-process registry, OCI layouts, docker archives, and a debootstrap'd Debian root
// filesystem cached outside the repository. It also reads tar streams back for comparisons.
//
// Helpers take a testing.TB and fail it on error; they are safe for concurrent use by parallel tests.
package imagetest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

// File describes one tar entry. Type defaults to a regular file (a directory when Name ends in
// "/"); Mode defaults to 0644 for files and 0755 for directories.
type File struct {
	Name   string
	Type   byte
	Body   string
	Link   string // symlink or hard link target
	Mode   int64
	UID    int
	GID    int
	Xattrs map[string]string
	// Size, when not zero, overrides the header's size (to forge lying headers).
	Size int64
}

// Dir, Reg, Symlink, Hardlink and Whiteout are shorthands for File values.
func Dir(name string) File             { return File{Name: strings.TrimSuffix(name, "/") + "/", Type: tar.TypeDir} }
func Reg(name, body string) File       { return File{Name: name, Body: body} }
func Symlink(name, target string) File { return File{Name: name, Type: tar.TypeSymlink, Link: target} }
func Hardlink(name, target string) File {
	return File{Name: name, Type: tar.TypeLink, Link: target}
}
func Whiteout(name string) File {
	return File{Name: filepath.Join(filepath.Dir(name), ".wh."+filepath.Base(name))}
}
func Opaque(dir string) File { return File{Name: filepath.Join(dir, ".wh..wh..opq")} }

// Tar returns an uncompressed tar of files, in order, with a fixed mtime.
func Tar(t testing.TB, files ...File) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	forged := false
	for _, f := range files {
		h := &tar.Header{Name: f.Name, Typeflag: f.Type, Linkname: f.Link, Mode: f.Mode, Uid: f.UID, Gid: f.GID,
			ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
			if strings.HasSuffix(f.Name, "/") {
				h.Typeflag = tar.TypeDir
			}
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(f.Body))
		}
		if f.Size != 0 {
			h.Size, forged = f.Size, true
		}
		for k, v := range f.Xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("imagetest: tar %s: %v", f.Name, err)
		}
		if h.Typeflag == tar.TypeReg && f.Size == 0 {
			if _, err := tw.Write([]byte(f.Body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if forged {
		// The header promised data that is not there: end the archive by hand.
		return append(b.Bytes(), make([]byte, 1024)...)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// Gzip compresses b.
func Gzip(t testing.TB, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// Digest returns "sha256:<hex>" of b.
func Digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// Layer makes a gzip-compressed OCI layer from an uncompressed tar.
func Layer(t testing.TB, tb []byte) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(tb)), nil },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Image stacks layers (uncompressed tars, bottom first) onto an empty image with cfg, for platform
// linux/amd64 unless cfg says otherwise. DiffIDs in the config are the real ones.
func Image(t testing.TB, cfg v1.Config, layers ...[]byte) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, l := range layers {
		var err error
		img, err = mutate.Append(img, mutate.Addendum{Layer: Layer(t, l), MediaType: types.OCILayer})
		if err != nil {
			t.Fatal(err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Config = cfg
	if cf.OS == "" {
		cf.OS, cf.Architecture = "linux", "amd64"
	}
	cf.Created = v1.Time{Time: time.Unix(1700000000, 0).UTC()}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// WithPlatform sets the image's platform in its config.
func WithPlatform(t testing.TB, img v1.Image, os, arch string) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = os, arch
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// Index makes a multi-platform index of images, each with the platform of its config.
func Index(t testing.TB, imgs ...v1.Image) v1.ImageIndex {
	t.Helper()
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, img := range imgs {
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant}}})
	}
	return idx
}

// Registry starts an in-process registry for the test and returns its host:port.
func Registry(t testing.TB) string {
	t.Helper()
	s := httptest.NewServer(registry.New(registry.Logger(discardLogger())))
	t.Cleanup(s.Close)
	return strings.TrimPrefix(s.URL, "http://")
}

// Push writes an image or an index to ref on an insecure (plain HTTP) registry.
func Push(t testing.TB, ref string, x remote.Taggable) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	switch v := x.(type) {
	case v1.Image:
		err = remote.Write(r, v)
	case v1.ImageIndex:
		err = remote.WriteIndex(r, v)
	default:
		t.Fatalf("imagetest: push %T", x)
	}
	if err != nil {
		t.Fatalf("imagetest: push %s: %v", ref, err)
	}
}

// DebianRootfs returns a tar of a minimal Debian bookworm root filesystem, the kind `docker
// export` writes: ext4test.DebianTar, made once by deploy/debian-rootfs.sh and cached.
func DebianRootfs(t testing.TB) string {
	t.Helper()
	return ext4test.DebianTar(t)
}

// Meta is what a comparison looks at for one path of a root filesystem.
type Meta struct {
	Type     byte
	Mode     int64
	UID, GID int
	Size     int64
	Link     string // symlink target
	Digest   string // of the content, regular files only
	Dev      string // "major,minor" for devices
}

func (m Meta) String() string {
	return fmt.Sprintf("type=%c mode=%o uid=%d gid=%d size=%d link=%q digest=%.19s dev=%s", m.Type, m.Mode, m.UID, m.GID, m.Size, m.Link, m.Digest, m.Dev)
}

// ReadTar reads a tar stream into path -> Meta, resolving hard links to their target's content.
// Names are cleaned ("./a/" becomes "a"; the root is ".").
func ReadTar(t testing.TB, r io.Reader) map[string]Meta {
	t.Helper()
	out := map[string]Meta{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("imagetest: read tar: %v", err)
		}
		n := Clean(h.Name)
		m := Meta{Type: h.Typeflag, Mode: h.Mode & 0o7777, UID: h.Uid, GID: h.Gid}
		switch h.Typeflag {
		case tar.TypeReg:
			m.Type = tar.TypeReg
			s := sha256.New()
			if _, err := io.Copy(s, tr); err != nil {
				t.Fatal(err)
			}
			m.Size, m.Digest = h.Size, hex.EncodeToString(s.Sum(nil))
		case tar.TypeLink:
			tgt, ok := out[Clean(h.Linkname)]
			if !ok {
				t.Fatalf("imagetest: hard link %s -> %s before its target", h.Name, h.Linkname)
			}
			m = tgt
		case tar.TypeSymlink:
			m.Link = h.Linkname
		case tar.TypeChar, tar.TypeBlock:
			m.Dev = fmt.Sprintf("%d,%d", h.Devmajor, h.Devminor)
		}
		out[n] = m
	}
}

// Clean normalises a tar name.
func Clean(n string) string {
	n = strings.Trim(filepath.Clean("/"+n), "/")
	if n == "" {
		return "."
	}
	return n
}

// Diff lists the differences between two trees, sorted; empty when equal.
func Diff(want, got map[string]Meta) []string {
	var d []string
	for k, w := range want {
		g, ok := got[k]
		switch {
		case !ok:
			d = append(d, "missing "+k+": "+w.String())
		case g != w:
			d = append(d, "differs "+k+":\n   want "+w.String()+"\n   got  "+g.String())
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			d = append(d, "extra "+k+": "+g.String())
		}
	}
	sort.Strings(d)
	return d
}

func discardLogger() *log.Logger { return log.New(io.Discard, "", 0) }

// ReadDir reads an unpacked root filesystem (e.g. umoci's) into path -> Meta, like ReadTar.
func ReadDir(t testing.TB, root string) map[string]Meta {
	t.Helper()
	out := map[string]Meta{}
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		st := fi.Sys().(*syscall.Stat_t)
		m := Meta{Mode: int64(fi.Mode().Perm()), UID: int(st.Uid), GID: int(st.Gid)}
		if fi.Mode()&os.ModeSetuid != 0 {
			m.Mode |= 0o4000
		}
		if fi.Mode()&os.ModeSetgid != 0 {
			m.Mode |= 0o2000
		}
		if fi.Mode()&os.ModeSticky != 0 {
			m.Mode |= 0o1000
		}
		switch {
		case fi.IsDir():
			m.Type = tar.TypeDir
		case fi.Mode()&os.ModeSymlink != 0:
			m.Type = tar.TypeSymlink
			m.Link, err = os.Readlink(p)
			if err != nil {
				return err
			}
		case fi.Mode()&os.ModeDevice != 0:
			m.Type = tar.TypeBlock
			if fi.Mode()&os.ModeCharDevice != 0 {
				m.Type = tar.TypeChar
			}
			m.Dev = fmt.Sprintf("%d,%d", unixMajor(st.Rdev), unixMinor(st.Rdev))
		case fi.Mode()&os.ModeNamedPipe != 0:
			m.Type = tar.TypeFifo
		case fi.Mode().IsRegular():
			m.Type = tar.TypeReg
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			s := sha256.New()
			_, err = io.Copy(s, f)
			f.Close()
			if err != nil {
				return err
			}
			m.Size, m.Digest = fi.Size(), hex.EncodeToString(s.Sum(nil))
		default:
			return fmt.Errorf("%s: unexpected file type %v", p, fi.Mode())
		}
		out[Clean(rel)] = m
		return nil
	})
	if err != nil {
		t.Fatalf("imagetest: read dir: %v", err)
	}
	return out
}

func unixMajor(dev uint64) uint64 { return (dev >> 8) & 0xfff }
func unixMinor(dev uint64) uint64 { return (dev & 0xff) | ((dev >> 12) & 0xfff00) }

// Umoci unpacks an image from a registry (through skopeo, as a user would script it) and returns
// its root filesystem folder. It needs root, skopeo and umoci.
func Umoci(t testing.TB, ref string) string {
	t.Helper()
	cmdtest.RequireRoot(t)
	skopeo, umoci := cmdtest.Tool(t, "skopeo"), cmdtest.Tool(t, "umoci")
	dir := t.TempDir()
	if b, err := exec.Command(skopeo, "copy", "--src-tls-verify=false", "--override-os", "linux", "--override-arch", "amd64",
		"docker://"+ref, "oci:"+filepath.Join(dir, "layout")+":img").CombinedOutput(); err != nil {
		t.Fatalf("imagetest: skopeo copy %s: %v\n%s", ref, err, b)
	}
	if b, err := exec.Command(umoci, "unpack", "--image", filepath.Join(dir, "layout")+":img", filepath.Join(dir, "bundle")).CombinedOutput(); err != nil {
		t.Fatalf("imagetest: umoci unpack: %v\n%s", err, b)
	}
	return filepath.Join(dir, "bundle", "rootfs")
}

// Heavy marks a test that builds large fixtures (see cmdtest.Heavy).
func Heavy(t testing.TB) { t.Helper(); cmdtest.Heavy(t) }
