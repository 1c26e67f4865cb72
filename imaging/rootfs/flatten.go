// Package rootfs flattens the layers of a container image into one root filesystem, as a tar
// stream, without unpacking anything to disk.
//
// Flattening takes two passes. The first reads each layer's tar headers into a TOC (a table of
// contents, cacheable by the layer digest, see BuildTOC) and merges them into an in-memory tree of
// metadata: OCI whiteouts and opaque directories, files replaced by directories and back, hard
// links whose target lives in a lower layer, symlinked parent directories resolved inside the image.
// The second pass streams the layers again, bottom-up, and writes only the entries that survive:
// every directory first (parents before children, with its final metadata), then each file once
// under its first surviving name, its other names as hard links right after it. The output is
// therefore a self-contained tar that any extractor (or imaging/ext4.WriteTar) reads in one go,
// whose names never cross a symlink and never contain "..".
//
// Go-containerregistry's mutate.Extract goes top-down in one pass and so emits a hard link before
// the lower-layer file it points to (or after that file was whited out); that is why this exists.
//
// Memory is bounded by metadata (a few hundred bytes per path). Functions are safe for concurrent
// use on different inputs; a Layer's Open may be called twice (once per pass).
package rootfs

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"strings"
	"time"
)

// Layer is one layer of an image, bottom first.
type Layer struct {
	// Digest is the expected sha256 digest of the blob Open returns ("sha256:<hex>"); empty skips
	// the check. It also names the layer in errors and in the TOC cache.
	Digest string
	// DiffID is the expected digest of the uncompressed tar, from the image config; empty skips it.
	DiffID string
	// Open returns the blob: a tar, plain, gzip or zstd compressed.
	Open func(ctx context.Context) (io.ReadCloser, error)
	// TOC, when not nil, is this layer's table of contents from a cache; the first pass then does
	// not read the blob. The second pass still checks the digest.
	TOC *TOC
}

// Options tune Flatten. The zero value is usable.
type Options struct {
	Limits Limits
	// Progress, when set, is called from Flatten's goroutine as the second pass reads layer i
	// (bytes of the blob read so far, cumulated).
	Progress func(layer int, read int64)
	// BlobVerified tells Stream that the caller checks the blob's digest itself (as a download
	// into the layer cache does, failing the whole operation on a mismatch), so it does not hash
	// the compressed bytes a second time. The diff_id is still checked.
	BlobVerified bool
}

// Stats describes a flattening.
type Stats struct {
	Files, Dirs, Links int
	Bytes              int64 // file data written
	TOCs               []*TOC
}

// Flatten merges layers and writes the resulting root filesystem to w as a tar stream. Layers
// without a TOC are read once more for it first. On error w holds a partial stream.
func Flatten(ctx context.Context, layers []Layer, w io.Writer, opts Options) (Stats, error) {
	lim := opts.Limits.fill()
	st := Stats{TOCs: make([]*TOC, len(layers))}
	for i, l := range layers {
		toc := l.TOC
		if toc == nil {
			var err error
			if toc, err = ReadTOC(ctx, l, lim); err != nil {
				return st, fmt.Errorf("rootfs: layer %d (%s): %w", i, l.Digest, err)
			}
		}
		st.TOCs[i] = toc
	}
	tr, err := Merge(st.TOCs, lim)
	if err != nil {
		return st, err
	}
	if err := tr.Write(ctx, layers, w, opts, &st); err != nil {
		return st, err
	}
	return st, nil
}

// ReadTOC opens a layer and builds its TOC, checking the digest and diffID.
func ReadTOC(ctx context.Context, l Layer, lim Limits) (*TOC, error) {
	rc, err := l.Open(ctx)
	if err != nil {
		return nil, fmt.Errorf("open: %w", err)
	}
	defer rc.Close()
	return BuildTOC(ctx, rc, l.Digest, l.DiffID, lim)
}

// Tree is the merged metadata of an image's layers, ready to be written.
type Tree struct {
	t    *tree
	dirs []*node
}

// Merge applies the layers' TOCs, bottom first, and returns the merged tree.
func Merge(tocs []*TOC, lim Limits) (*Tree, error) {
	lim = lim.fill()
	t := newTree(lim.MaxEntries)
	for i, toc := range tocs {
		if err := t.apply(i, toc.Entries); err != nil {
			return nil, fmt.Errorf("rootfs: layer %d (%s): %w: %w", i, toc.Digest, ErrInvalid, err)
		}
	}
	return &Tree{t: t, dirs: t.finish()}, nil
}

// Write runs the second pass: it streams the layers and writes the surviving entries to w.
func (tr *Tree) Write(ctx context.Context, layers []Layer, w io.Writer, opts Options, st *Stats) error {
	if st == nil {
		st = &Stats{}
	}
	lim := opts.Limits.fill()
	tw := tar.NewWriter(w)
	root := tr.t.root.dir
	if root != nil {
		h := header(root, "./")
		h.Typeflag = tar.TypeDir
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("rootfs: write ./: %w", err)
		}
	}
	for _, d := range tr.dirs {
		var h *tar.Header
		if d.dir != nil {
			h = header(d.dir, d.path()+"/")
		} else {
			h = &tar.Header{Name: d.path() + "/", Mode: 0o755, ModTime: time.Unix(0, 0)}
		}
		h.Typeflag = tar.TypeDir
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("rootfs: write %s: %w", h.Name, err)
		}
		st.Dirs++
	}
	// Which layers have something to give?
	need := make([]bool, len(layers))
	for k := range tr.t.sources {
		need[k[0]] = true
	}
	for i, l := range layers {
		if !need[i] {
			continue
		}
		if err := tr.writeLayer(ctx, i, l, tw, lim, opts.Progress, st); err != nil {
			return fmt.Errorf("rootfs: layer %d (%s): %w", i, l.Digest, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("rootfs: finish tar: %w", err)
	}
	return nil
}

func (tr *Tree) writeLayer(ctx context.Context, i int, l Layer, tw *tar.Writer, lim Limits, progress func(int, int64), st *Stats) error {
	rc, err := l.Open(ctx)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	defer rc.Close()
	var r io.Reader = rc
	if progress != nil {
		r = &progressReader{r: rc, fn: func(n int64) { progress(i, n) }}
	}
	idx := 0
	var entries []Entry
	if l.TOC != nil {
		entries = l.TOC.Entries
	} else if i < len(st.TOCs) && st.TOCs[i] != nil {
		entries = st.TOCs[i].Entries
	}
	// The second pass checks the blob digest only: the diff_id was checked by the first pass (or
	// when the cached TOC was made) and the blob digest pins the same bytes.
	return scan(ctx, r, lim, false, func(h *tar.Header, data io.Reader) error {
		defer func() { idx++ }()
		if entries != nil && (idx >= len(entries) || !entries[idx].sameHeader(h)) {
			return fmt.Errorf("entry %d (%q) differs from the first pass: %w", idx, h.Name, ErrDigest)
		}
		ino := tr.t.sources[[2]int{i, idx}]
		if ino == nil {
			return nil
		}
		first := ino.names[0]
		hd := header(ino.ent, first)
		if err := tw.WriteHeader(hd); err != nil {
			return fmt.Errorf("write %s: %w", first, err)
		}
		if hd.Typeflag == tar.TypeReg {
			n, err := io.Copy(tw, data)
			if err != nil {
				return fmt.Errorf("write %s: %w", first, err)
			}
			st.Bytes += n
		}
		st.Files++
		for _, name := range ino.names[1:] {
			lh := header(ino.ent, name)
			lh.Typeflag, lh.Linkname, lh.Size = tar.TypeLink, first, 0
			if err := tw.WriteHeader(lh); err != nil {
				return fmt.Errorf("write %s: %w", name, err)
			}
			st.Links++
		}
		return nil
	}, func(d digests) error {
		return d.check(l.Digest, "")
	})
}

// header builds a fresh tar header from an entry (no format, atime or ctime carried over, so the
// writer picks the smallest format that fits and the output only depends on the content).
func header(e *Entry, name string) *tar.Header {
	h := &tar.Header{
		Name:     name,
		Linkname: e.Linkname,
		Typeflag: e.Type,
		Mode:     e.Mode,
		Uid:      e.UID,
		Gid:      e.GID,
		Uname:    e.Uname,
		Gname:    e.Gname,
		ModTime:  time.Unix(0, e.ModTime),
		Devmajor: e.Devmajor,
		Devminor: e.Devminor,
	}
	switch e.Type {
	case tar.TypeReg:
		h.Size = e.Size
	case tar.TypeSymlink:
		h.Mode = h.Mode&^0o7777 | 0o777 // a symlink's permissions are always 0777 on Linux
	}
	if e.Type != tar.TypeChar && e.Type != tar.TypeBlock {
		h.Devmajor, h.Devminor = 0, 0
	}
	if len(e.Xattrs) > 0 {
		h.PAXRecords = make(map[string]string, len(e.Xattrs))
		for k, v := range e.Xattrs {
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	return h
}

type progressReader struct {
	r  io.Reader
	n  int64
	fn func(int64)
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.n += int64(n)
	p.fn(p.n)
	return n, err
}

// Resolve returns where a path of the merged image really lives: symlinked directories on the way
// are followed inside the image (the last component is not), and components that do not exist
// are kept as given. The result is relative to the root. Callers adding files next to the image
// (the guest agent at /sbin/virtkit-agent on a usrmerged distribution, where /sbin is a symlink)
// use it so that they do not replace a symlink with a directory.
func (tr *Tree) Resolve(name string) (string, error) {
	parts, err := cleanName(name)
	if err != nil {
		return "", err
	}
	if len(parts) == 0 {
		return ".", nil
	}
	// Walk the longest existing directory prefix.
	for i := len(parts) - 1; i >= 0; i-- {
		dir, err := tr.t.lookup(parts[:i], true, false)
		if err != nil || dir == nil || !dir.isDir() {
			continue
		}
		rest := strings.Join(parts[i:], "/")
		if dir.parent == nil {
			return rest, nil
		}
		return dir.path() + "/" + rest, nil
	}
	return strings.Join(parts, "/"), nil
}
