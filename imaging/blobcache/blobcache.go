// Package blobcache is a content-addressed cache of image layer blobs and their tables of contents
// (imaging/rootfs TOCs), shared by every image that uses a layer.
//
// A blob is only ever published under its digest after its bytes were hashed and found equal, by
// writing a private temporary file and renaming it into place; a failed or truncated download
// leaves nothing behind, and a blob later found corrupt is evicted. Fetches of one digest are
// serialised across processes with an flock, so two conversions sharing a layer download it once.
// A Cache is safe for concurrent use.
package blobcache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"

	"github.com/virtkit/virtkit/imaging/rootfs"
	"github.com/virtkit/virtkit/internal/flock"
)

// Cache keeps blobs under Dir/sha256/<hex>.
type Cache struct {
	Dir string
}

var digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// ErrDigest is wrapped by errors for downloaded bytes that do not match their digest or size.
var ErrDigest = rootfs.ErrDigest

func (c *Cache) path(digest string) (string, error) {
	if !digestRE.MatchString(digest) {
		return "", fmt.Errorf("blobcache: digest %q: want sha256:<64 hex digits>", digest)
	}
	return filepath.Join(c.Dir, "sha256", digest[len("sha256:"):]), nil
}

// Open opens a cached blob; the error wraps os.ErrNotExist when it is not cached.
func (c *Cache) Open(digest string) (*os.File, error) {
	p, err := c.path(digest)
	if err != nil {
		return nil, err
	}
	return os.Open(p)
}

// Has reports whether a blob is cached.
func (c *Cache) Has(digest string) bool {
	p, err := c.path(digest)
	if err != nil {
		return false
	}
	_, err = os.Stat(p)
	return err == nil
}

// Verify rehashes a cached blob and reports whether it still matches its digest.
func (c *Cache) Verify(digest string) bool {
	f, err := c.Open(digest)
	if err != nil {
		return false
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return false
	}
	return "sha256:"+hex.EncodeToString(h.Sum(nil)) == digest
}

// Evict removes a blob and its TOC (after a later read found it corrupt).
func (c *Cache) Evict(digest string) {
	if p, err := c.path(digest); err == nil {
		os.Remove(p)
		os.Remove(p + ".toc")
	}
}

// Fetch makes sure a blob is cached, calling open to download it when it is not. size is the
// expected length (-1 when unknown). progress, when not nil, gets the bytes read so far. It
// returns whether it downloaded.
func (c *Cache) Fetch(ctx context.Context, digest string, size int64, open func(context.Context) (io.ReadCloser, error), progress func(int64)) (bool, error) {
	p, err := c.path(digest)
	if err != nil {
		return false, err
	}
	if _, err := os.Stat(p); err == nil {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return false, fmt.Errorf("blobcache: %w", err)
	}
	unlock, err := lock(ctx, p+".lock")
	if err != nil {
		return false, err
	}
	defer unlock()
	if _, err := os.Stat(p); err == nil {
		return false, nil
	}
	rc, err := open(ctx)
	if err != nil {
		return false, fmt.Errorf("blobcache: fetch %s: %w", digest, err)
	}
	defer rc.Close()
	f, err := os.CreateTemp(filepath.Dir(p), ".fetch-")
	if err != nil {
		return false, fmt.Errorf("blobcache: %w", err)
	}
	defer os.Remove(f.Name())
	h := sha256.New()
	var r io.Reader = rc
	if size >= 0 {
		r = io.LimitReader(rc, size+1) // one more byte to notice a blob longer than announced
	}
	w := io.MultiWriter(f, h)
	var n int64
	buf := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			f.Close()
			return false, err
		}
		m, rerr := r.Read(buf)
		if m > 0 {
			if _, err := w.Write(buf[:m]); err != nil {
				f.Close()
				return false, fmt.Errorf("blobcache: write %s: %w", digest, err)
			}
			n += int64(m)
			if progress != nil {
				progress(n)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			f.Close()
			return false, fmt.Errorf("blobcache: fetch %s after %d bytes: %w", digest, n, rerr)
		}
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return false, fmt.Errorf("blobcache: write %s: %w", digest, err)
	}
	if err := f.Close(); err != nil {
		return false, fmt.Errorf("blobcache: write %s: %w", digest, err)
	}
	if size >= 0 && n != size {
		return false, fmt.Errorf("blobcache: fetch %s: got %d bytes, the manifest says %d: %w", digest, n, size, ErrDigest)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		return false, fmt.Errorf("blobcache: fetch %s: content is %s: %w", digest, got, ErrDigest)
	}
	if err := os.Rename(f.Name(), p); err != nil {
		return false, fmt.Errorf("blobcache: publish %s: %w", digest, err)
	}
	return true, nil
}

// TOC returns the cached table of contents of a blob, if there is a valid one.
func (c *Cache) TOC(digest string) (*rootfs.TOC, bool) {
	p, err := c.path(digest)
	if err != nil {
		return nil, false
	}
	data, err := os.ReadFile(p + ".toc")
	if err != nil {
		return nil, false
	}
	toc, err := rootfs.UnmarshalTOC(data)
	if err != nil || toc.Digest != digest {
		return nil, false
	}
	return toc, true
}

// PutTOC caches the table of contents of a blob (toc.Digest names it).
func (c *Cache) PutTOC(toc *rootfs.TOC) error {
	p, err := c.path(toc.Digest)
	if err != nil {
		return err
	}
	data, err := toc.MarshalBinary()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("blobcache: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(p), ".toc-")
	if err != nil {
		return fmt.Errorf("blobcache: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("blobcache: write toc: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("blobcache: write toc: %w", err)
	}
	if err := os.Rename(f.Name(), p+".toc"); err != nil {
		return fmt.Errorf("blobcache: write toc: %w", err)
	}
	return nil
}

func lock(ctx context.Context, path string) (func(), error) {
	unlock, err := flock.Lock(ctx, path)
	if err != nil {
		if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
			return nil, err
		}
		return nil, fmt.Errorf("blobcache: lock: %w", err)
	}
	return unlock, nil
}
