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

// extract applies a tar stream the way an extractor (and imaging/ext4) does: later entries
// replace earlier ones, a non-directory replaces a whole subtree, missing parents are made.
func extract(t *testing.T, r io.Reader) map[string]imagetest.Meta {
	t.Helper()
	var b bytes.Buffer
	tr := tar.NewReader(io.TeeReader(r, &b))
	out := map[string]imagetest.Meta{}
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		name := imagetest.Clean(h.Name)
		// One entry read alone, through ReadTar, gives its Meta (links resolved against out).
		var one bytes.Buffer
		tw := tar.NewWriter(&one)
		h2 := *h
		if h.Typeflag == tar.TypeLink {
			m, ok := out[imagetest.Clean(h.Linkname)]
			if !ok {
				t.Fatalf("hard link %s to missing %s", h.Name, h.Linkname)
			}
			removeUnder(out, name)
			out[name] = m
			continue
		}
		tw.WriteHeader(&h2)
		io.Copy(tw, tr)
		tw.Close()
		m := imagetest.ReadTar(t, &one)[name]
		if old, ok := out[name]; !(ok && old.Type == tar.TypeDir && m.Type == tar.TypeDir) {
			removeUnder(out, name)
		}
		for p := name; strings.Contains(p, "/"); {
			p = p[:strings.LastIndex(p, "/")]
			if o, ok := out[p]; !ok {
				out[p] = imagetest.Meta{Type: tar.TypeDir, Mode: 0o755}
			} else if o.Type != tar.TypeDir {
				t.Fatalf("%s under non-directory %s", name, p)
			}
		}
		out[name] = m
	}
	return out
}

func removeUnder(m map[string]imagetest.Meta, p string) {
	for k := range m {
		if strings.HasPrefix(k, p+"/") {
			delete(m, k)
		}
	}
}

// Stream's one-pass output extracts to the same tree as Flatten's canonical output.
func TestStreamMatchesFlatten(t *testing.T) {
	for name, layer := range map[string][]F{
		"plain":             {dir("etc"), reg("etc/a", "a"), F{Name: "etc/su", Body: "su", Mode: 0o4755}, sym("l", "etc"), reg("l/b", "b")},
		"duplicates":        {reg("a", "1"), reg("a", "2"), dir("d"), reg("d/x", "x"), reg("d", "file now"), dir("d"), reg("d/y", "y")},
		"hard links":        {reg("a", "1"), hard("b", "a"), reg("a", "2"), hard("c", "b"), hard("c", "a")},
		"implicit parents":  {reg("x/y/z", "z"), dir("x/y")},
		"whiteouts ignored": {reg("a", "1"), wh("a"), opq("d"), reg("d/k", "k")},
		"usrmerge":          {dir("usr"), dir("usr/sbin"), sym("sbin", "usr/sbin"), reg("sbin/init", "init"), sym("abs", "/usr"), reg("abs/x", "x")},
		"dangling parent":   {sym("esc", "../../../../opt"), reg("esc/c", "c")},
	} {
		t.Run(name, func(t *testing.T) {
			tb := imagetest.Gzip(t, imagetest.Tar(t, layer...))
			l := rootfs.Layer{Digest: imagetest.Digest(tb), Open: func(context.Context) (io.ReadCloser, error) {
				return io.NopCloser(bytes.NewReader(tb)), nil
			}}
			var flat bytes.Buffer
			if _, err := rootfs.Flatten(context.Background(), []rootfs.Layer{l}, &flat, rootfs.Options{}); err != nil {
				t.Fatal(err)
			}
			var one bytes.Buffer
			tw := tar.NewWriter(&one)
			toc, tree, err := rootfs.Stream(context.Background(), bytes.NewReader(tb), l, tw, rootfs.Options{})
			if err != nil {
				t.Fatal(err)
			}
			tw.Close()
			if toc.Digest != l.Digest || len(toc.Entries) != len(layer) {
				t.Errorf("toc %s with %d entries", toc.Digest, len(toc.Entries))
			}
			if _, err := tree.Resolve("/sbin/x"); err != nil {
				t.Error(err)
			}
			want, got := extract(t, &flat), extract(t, &one)
			delete(want, ".")
			delete(got, ".")
			if d := imagetest.Diff(want, got); len(d) > 0 {
				t.Errorf("stream differs from flatten:\n%s", strings.Join(d, "\n"))
			}
		})
	}
	// Errors are the same as Flatten's.
	tb := imagetest.Tar(t, reg("../x", "x"))
	_, _, err := rootfs.Stream(context.Background(), bytes.NewReader(tb), rootfs.Layer{}, tar.NewWriter(io.Discard), rootfs.Options{})
	if !errors.Is(err, rootfs.ErrInvalid) {
		t.Errorf("error %v, want ErrInvalid", err)
	}
	_, _, err = rootfs.Stream(context.Background(), bytes.NewReader(tb), rootfs.Layer{Digest: imagetest.Digest(nil)}, tar.NewWriter(io.Discard), rootfs.Options{})
	if err == nil {
		t.Error("wrong digest accepted")
	}
}

// With BlobVerified (the caller checks the blob's digest while downloading it) Stream does not
// hash the compressed blob again, but still checks the diff_id, and still checks a plain tar,
// which is its own diff_id.
func TestStreamBlobVerified(t *testing.T) {
	plain := imagetest.Tar(t, reg("a", "1"), dir("d"))
	gz := imagetest.Gzip(t, plain)
	opts := rootfs.Options{BlobVerified: true}
	stream := func(blob []byte, l rootfs.Layer) (*rootfs.TOC, error) {
		toc, _, err := rootfs.Stream(context.Background(), bytes.NewReader(blob), l, tar.NewWriter(io.Discard), opts)
		return toc, err
	}
	toc, err := stream(gz, rootfs.Layer{Digest: imagetest.Digest(gz), DiffID: imagetest.Digest(plain)})
	if err != nil || toc.Digest != imagetest.Digest(gz) || toc.DiffID != imagetest.Digest(plain) {
		t.Fatalf("verified gzip layer: %v, toc %+v", err, toc)
	}
	if _, err := stream(gz, rootfs.Layer{Digest: imagetest.Digest(gz), DiffID: imagetest.Digest(nil)}); !errors.Is(err, rootfs.ErrDigest) {
		t.Errorf("lying diff_id: %v, want ErrDigest", err)
	}
	if _, err := stream(plain, rootfs.Layer{Digest: imagetest.Digest(nil)}); !errors.Is(err, rootfs.ErrDigest) {
		t.Errorf("plain tar with a wrong digest: %v, want ErrDigest", err)
	}
}

// BuildTOCSpool copies the whole uncompressed tar (its diff_id) aside for a second pass.
func TestBuildTOCSpool(t *testing.T) {
	plain := imagetest.Tar(t, reg("a", strings.Repeat("x", 300<<10)), dir("d"), reg("d/b", "b"))
	for name, blob := range map[string][]byte{"gzip": imagetest.Gzip(t, plain), "plain": plain} {
		var spool bytes.Buffer
		toc, err := rootfs.BuildTOCSpool(context.Background(), bytes.NewReader(blob), imagetest.Digest(blob), imagetest.Digest(plain), rootfs.Limits{}, &spool)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !bytes.Equal(spool.Bytes(), plain) || toc.DiffID != imagetest.Digest(spool.Bytes()) || len(toc.Entries) != 3 {
			t.Errorf("%s: spooled %d bytes (want %d), diff_id %s, %d entries", name, spool.Len(), len(plain), toc.DiffID, len(toc.Entries))
		}
	}
}
