package rootfs

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
)

// Stream flattens a single-layer image in one pass over its blob, for consumers with tar
// extraction semantics (a later entry replaces an earlier one of the same name, a directory over a
// directory takes the new metadata, missing parents are made), such as imaging/ext4.WriteTar.
//
// With one layer there is nothing below it to hide, so each entry's fate is known when it is
// read: whiteouts are dropped, names are resolved through symlinked parents against the tree as
// it stands (as Flatten's merge does), hard links point at the current name of their target, and
// the entry is written at once. The result extracts to the same tree as Flatten's output, but it is
// not canonical (a name may appear twice, parents may be implicit), which is why oci-pull keeps
// Flatten. Compared with Flatten it decompresses the layer once instead of twice.
//
// It checks l.Digest and l.DiffID when they are set (after the last entry: a caller must discard
// the output on error), does not close tw (callers append entries), and returns the layer's TOC
// and the merged tree, for Resolve.
func Stream(ctx context.Context, r io.Reader, l Layer, tw *tar.Writer, opts Options) (*TOC, *Tree, error) {
	return StreamTo(ctx, r, l, func(hd *tar.Header, data io.Reader) error {
		if err := tw.WriteHeader(hd); err != nil {
			return fmt.Errorf("write %s: %w", hd.Name, err)
		}
		if hd.Typeflag == tar.TypeReg {
			if _, err := io.Copy(tw, data); err != nil {
				return fmt.Errorf("write %s: %w", hd.Name, err)
			}
		}
		return nil
	}, opts)
}

// StreamTo is Stream handing each output entry to add instead of a tar writer (data reads a
// regular file's hd.Size bytes, and only until add returns), for a consumer that takes parsed
// entries, such as imaging/ext4.Writer.
func StreamTo(ctx context.Context, r io.Reader, l Layer, add func(hd *tar.Header, data io.Reader) error, opts Options) (*TOC, *Tree, error) {
	lim := opts.Limits.fill()
	t := newTree(lim.MaxEntries)
	toc := &TOC{Version: tocVersion}
	err := scanSpool(ctx, r, lim, !opts.BlobVerified, true, nil, func(h *tar.Header, data io.Reader) error {
		if len(toc.Entries) >= lim.MaxEntries {
			return fmt.Errorf("more than %d entries: %w", lim.MaxEntries, ErrLimit)
		}
		idx := len(toc.Entries)
		toc.Entries = append(toc.Entries, entryOf(h))
		e := new(Entry)
		*e = toc.Entries[idx]
		parts, err := cleanName(e.Name)
		if err != nil {
			return fmt.Errorf("%w: entry %q: %w", ErrInvalid, e.Name, err)
		}
		n, target, err := t.place(0, idx, e, parts)
		if err != nil {
			return fmt.Errorf("%w: entry %q: %w", ErrInvalid, e.Name, err)
		}
		if n == nil {
			return nil
		}
		var hd *tar.Header
		switch {
		case n == t.root:
			hd = header(e, "./")
		case e.Type == tar.TypeDir:
			hd = header(e, n.path()+"/")
		case e.Type == tar.TypeLink:
			hd = header(target.ino.ent, n.path())
			hd.Typeflag, hd.Linkname, hd.Size = tar.TypeLink, target.path(), 0
		default:
			hd = header(e, n.path())
		}
		return add(hd, data)
	}, func(d digests) error {
		if d.blob == "" {
			d.blob = l.Digest // verified by the caller
		}
		toc.Digest, toc.Size, toc.DiffID, toc.Uncompressed = d.blob, d.blobSize, d.diff, d.diffSize
		return d.check(l.Digest, l.DiffID)
	})
	if err != nil {
		return nil, nil, fmt.Errorf("rootfs: layer 0 (%s): %w", l.Digest, err)
	}
	return toc, &Tree{t: t}, nil
}
