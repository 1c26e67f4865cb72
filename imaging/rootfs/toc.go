package rootfs

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/gob"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// tocVersion changes whenever Entry or the way a TOC is computed changes, so cached TOCs of an
// older layout are recomputed rather than misread.
const tocVersion = 1

// Entry is one tar header of a layer, reduced to what the flattener and the output need.
type Entry struct {
	Name     string
	Linkname string
	Type     byte
	Mode     int64
	UID, GID int
	Uname    string
	Gname    string
	ModTime  int64 // Unix nanoseconds
	Size     int64
	Devmajor int64
	Devminor int64
	// Xattrs holds the SCHILY.xattr.* PAX records, keyed without the prefix.
	Xattrs map[string]string
}

// TOC is the table of contents of one layer: every tar header in archive order, plus the digests
// that were verified while reading it. A TOC is a pure function of the layer's bytes, so it can be
// cached by the layer's digest.
type TOC struct {
	Version int
	// Digest is sha256 of the layer blob as stored (compressed or not), "sha256:<hex>".
	Digest string
	// Size is the length of the blob as stored.
	Size int64
	// DiffID is sha256 of the uncompressed tar stream, "sha256:<hex>".
	DiffID string
	// Uncompressed is the length of the uncompressed tar stream.
	Uncompressed int64
	Entries      []Entry
}

// MarshalBinary encodes the TOC for a cache.
func (t *TOC) MarshalBinary() ([]byte, error) {
	var b bytes.Buffer
	type plain TOC // without the methods, so gob does not call MarshalBinary again
	if err := gob.NewEncoder(&b).Encode((*plain)(t)); err != nil {
		return nil, fmt.Errorf("rootfs: encode toc: %w", err)
	}
	return b.Bytes(), nil
}

// UnmarshalTOC decodes a TOC written by MarshalBinary. A TOC of another version is an error, so
// callers treat it as a cache miss.
func UnmarshalTOC(data []byte) (*TOC, error) {
	type plain TOC
	var t TOC
	if err := gob.NewDecoder(bytes.NewReader(data)).Decode((*plain)(&t)); err != nil {
		return nil, fmt.Errorf("rootfs: decode toc: %w", err)
	}
	if t.Version != tocVersion {
		return nil, fmt.Errorf("rootfs: decode toc: version %d, want %d", t.Version, tocVersion)
	}
	return &t, nil
}

func entryOf(h *tar.Header) Entry {
	e := Entry{
		Name:     h.Name,
		Linkname: h.Linkname,
		Type:     h.Typeflag,
		Mode:     h.Mode,
		UID:      h.Uid,
		GID:      h.Gid,
		Uname:    h.Uname,
		Gname:    h.Gname,
		ModTime:  h.ModTime.UnixNano(),
		Size:     h.Size,
		Devmajor: h.Devmajor,
		Devminor: h.Devminor,
	}
	if e.Type == tar.TypeGNUSparse {
		e.Type = tar.TypeReg
	}
	for k, v := range h.PAXRecords {
		if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if e.Xattrs == nil {
				e.Xattrs = map[string]string{}
			}
			e.Xattrs[x] = v
		}
	}
	return e
}

// sameHeader reports whether a header read on the second pass is the one the TOC recorded.
func (e *Entry) sameHeader(h *tar.Header) bool {
	t := h.Typeflag
	if t == tar.TypeGNUSparse {
		t = tar.TypeReg
	}
	return e.Name == h.Name && e.Type == t && e.Size == h.Size && e.Linkname == h.Linkname
}

// Limits bound what a layer may cost, so a hostile layer (a zip bomb, a sparse bomb, millions of
// tiny entries) fails with a clear error instead of exhausting the host. Zero fields take defaults.
type Limits struct {
	// MaxBytes bounds the uncompressed bytes of one layer and, separately, the sum of the file sizes
	// its headers declare (sparse files expand to their declared size). Default 32 GiB.
	MaxBytes int64
	// MaxEntries bounds the entries of one layer and of the merged tree. Default 4 Mi.
	MaxEntries int
}

func (l Limits) fill() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = 32 << 30
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = 4 << 20
	}
	return l
}

// ErrLimit is wrapped by errors for input over a Limits bound.
var ErrLimit = errors.New("over limit")

// ErrInvalid is wrapped by errors for layer content that cannot make a root filesystem (names
// climbing out with "..", hard links to nothing, unsupported entry types): retrying cannot help.
var ErrInvalid = errors.New("invalid layer")

// ErrDigest is wrapped by errors for a blob whose size or digest is not the one expected.
var ErrDigest = errors.New("digest mismatch")

// BuildTOC reads a whole layer blob (plain, gzip or zstd tar), checks it against the expected digest
// and diffID when they are not empty, and returns its table of contents. It reads r to the end.
func BuildTOC(ctx context.Context, r io.Reader, digest, diffID string, lim Limits) (*TOC, error) {
	return BuildTOCSpool(ctx, r, digest, diffID, lim, nil)
}

// BuildTOCSpool is BuildTOC that also writes the whole uncompressed tar to spool (when not nil),
// so that a second pass can read it instead of decompressing the blob again. The spool's content
// has the layer's diff_id, checked here when diffID is given; a second pass reading it should
// check that digest again (a plain tar is its own digest). Write errors on spool do not fail
// BuildTOCSpool: spool must remember them, and its owner not use a spool it failed to write.
func BuildTOCSpool(ctx context.Context, r io.Reader, digest, diffID string, lim Limits, spool io.Writer) (*TOC, error) {
	lim = lim.fill()
	toc := &TOC{Version: tocVersion}
	err := scanSpool(ctx, r, lim, true, true, spool, func(h *tar.Header, _ io.Reader) error {
		if len(toc.Entries) >= lim.MaxEntries {
			return fmt.Errorf("more than %d entries: %w", lim.MaxEntries, ErrLimit)
		}
		toc.Entries = append(toc.Entries, entryOf(h))
		return nil
	}, func(d digests) error {
		toc.Digest, toc.Size, toc.DiffID, toc.Uncompressed = d.blob, d.blobSize, d.diff, d.diffSize
		return d.check(digest, diffID)
	})
	if err != nil {
		return nil, err
	}
	return toc, nil
}

type digests struct {
	blob, diff         string
	blobSize, diffSize int64
}

func (d digests) check(digest, diffID string) error {
	if digest != "" && d.blob != digest {
		return fmt.Errorf("blob is %s (%d bytes), want %s: %w", d.blob, d.blobSize, digest, ErrDigest)
	}
	if diffID != "" && d.diff != diffID {
		return fmt.Errorf("uncompressed content is %s, want diff_id %s: %w", d.diff, diffID, ErrDigest)
	}
	return nil
}

// errorless hides a spool's write errors from the TeeReader feeding it (see BuildTOCSpool).
type errorless struct{ w io.Writer }

func (e errorless) Write(p []byte) (int, error) {
	e.w.Write(p)
	return len(p), nil
}

// counter counts what passes through it and stops at a byte limit.
type counter struct {
	r     io.Reader
	n     int64
	limit int64 // 0: none
	what  string
}

func (c *counter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if c.limit > 0 && c.n > c.limit {
		return n, fmt.Errorf("%s exceeds %d bytes: %w", c.what, c.limit, ErrLimit)
	}
	return n, err
}

// scan decompresses a layer blob and calls fn for each tar header with a reader of its data, then
// drains the streams, computes their digests and calls done. Errors name no layer: callers do.
//
// diff says whether the uncompressed stream's digest is wanted (it costs a second SHA-256 over
// the whole layer when the layer is compressed; for a plain tar it is the blob digest).
func scan(ctx context.Context, r io.Reader, lim Limits, diff bool, fn func(*tar.Header, io.Reader) error, done func(digests) error) error {
	return scanSpool(ctx, r, lim, true, diff, nil, fn, done)
}

// scanSpool is scan that may skip the blob's digest of a compressed blob (blob false:
// digests.blob is then empty; a plain tar's is always computed, being its diff_id) and copies
// the uncompressed stream to spool when it is not nil.
func scanSpool(ctx context.Context, r io.Reader, lim Limits, blob, diff bool, spool io.Writer, fn func(*tar.Header, io.Reader) error, done func(digests) error) error {
	// The blob is read and its digest computed on goroutines of their own (see aheadReader).
	rawAhead := newAheadReader(ctx, r, sha256.New())
	defer rawAhead.Close()
	raw := &counter{r: rawAhead}
	br := bufio.NewReaderSize(raw, 1<<16)
	magic, _ := br.Peek(4)
	var dec io.Reader = br
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("gzip: %w", err)
		}
		defer zr.Close()
		dec = zr
	case len(magic) == 4 && bytes.Equal(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(1<<27), zstd.WithDecoderLowmem(true))
		if err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
		defer zr.Close()
		dec = zr
	}
	compressed := dec != io.Reader(br)
	if compressed && !blob {
		rawAhead.noHash()
	}
	var ahead *aheadReader
	if compressed {
		// Decompression runs on its own goroutine, the diff_id on another, the tar parsing and
		// fn on this one.
		var h hash.Hash
		if diff {
			h = sha256.New()
		}
		ahead = newAheadReader(ctx, dec, h)
		defer ahead.Close() // before the decompressor's Close (deferred earlier): it reads it
		dec = ahead
	}
	plain := &counter{r: dec, limit: lim.MaxBytes, what: "uncompressed layer"}
	var tarIn io.Reader = plain
	if spool != nil {
		tarIn = io.TeeReader(plain, errorless{spool})
	}
	tr := tar.NewReader(tarIn)
	var declared int64
	for i := 0; ; i++ {
		if i&255 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read tar entry %d: %w", i, err)
		}
		if h.Size < 0 {
			return fmt.Errorf("tar entry %q: negative size", h.Name)
		}
		declared += h.Size
		if declared > lim.MaxBytes || declared < 0 {
			return fmt.Errorf("declared file sizes exceed %d bytes: %w", lim.MaxBytes, ErrLimit)
		}
		if err := fn(h, tr); err != nil {
			return err
		}
	}
	// The diff_id covers the whole uncompressed stream, padding included; draining the decompressor
	// to EOF also checks the gzip CRC / zstd checksum.
	if _, err := io.Copy(io.Discard, tarIn); err != nil {
		return fmt.Errorf("read layer: %w", err)
	}
	if _, err := io.Copy(io.Discard, br); err != nil {
		return fmt.Errorf("read layer: %w", err)
	}
	d := digests{blobSize: raw.n, diffSize: plain.n}
	if blob || !compressed {
		// A plain tar is its own diff_id: then the blob digest is needed whatever blob says.
		d.blob = rawAhead.sum()
	}
	switch {
	case !compressed:
		d.diff = d.blob
	case diff:
		d.diff = ahead.sum()
	}
	return done(d)
}
