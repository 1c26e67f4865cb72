// Package oci turns container images into root filesystems: Pull writes an image's flattened root
// filesystem as a tar stream, Convert makes a bootable bundle (an ext4 root filesystem with the
// guest agent injected, and the image config) in the content-addressed bundle store.
//
// Images come from registries (docker://REF or a bare REF, authenticated with go-containerregistry's
// default keychain), OCI image layouts (oci:PATH[:TAG]), `docker save` archives
// (docker-archive:PATH) and root filesystem tarballs (tar:PATH). Registry layers are kept in a
// layer cache by digest, shared between images, with their tables of contents, so a layer is
// downloaded and indexed once. Every blob is checked against its digest and size, every layer
// against the config's diff_id, and nothing that failed a check is ever cached.
//
// Functions are safe for concurrent use, in one process and across processes sharing the cache
// and store folders (see imaging/blobcache and imaging/store).
package oci

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/virtkit/virtkit/imaging/blobcache"
	"github.com/virtkit/virtkit/imaging/rootfs"
)

// Options say where images come from and how they are read. The zero value is usable: linux/amd64,
// the default keychain, no layer cache, pull policy "missing".
type Options struct {
	// Platform picks the image of a multi-platform index: os/arch[/variant]. Default linux/amd64.
	Platform string
	// Insecure allows plain-HTTP registries.
	Insecure bool
	// Keychain authenticates to registries; default authn.DefaultKeychain (docker config, helpers).
	Keychain authn.Keychain
	// Transport carries registry requests; default go-containerregistry's.
	Transport http.RoundTripper
	// CacheDir holds the layer cache; empty means a temporary one per call.
	CacheDir string
	// Pull is the policy for tags: "always" asks the registry what a tag points at (one HEAD
	// request), "missing" (default) only when this host never resolved it, "never" not at all.
	// References by digest never need the network once converted.
	Pull string
	// Limits bound what a hostile layer may cost.
	Limits rootfs.Limits
	// Progress, when set, receives progress events from the calling goroutine or from fetch
	// goroutines (it must be safe for concurrent use).
	Progress func(Event)
	// Log receives debug lines; the zero logger discards them.
	Log zerolog.Logger
}

// Event reports progress.
type Event struct {
	// Phase is "fetch" (downloading layer Layer), "index" (reading its table of contents),
	// "flatten" (streaming layer Layer into the output) or "done".
	Phase  string
	Layer  int
	Layers int
	Bytes  int64 // bytes of this layer so far
	Total  int64 // bytes of this layer, -1 when unknown
}

const (
	PullAlways  = "always"
	PullMissing = "missing"
	PullNever   = "never"
)

func (o *Options) check() error {
	switch o.Pull {
	case "", PullAlways, PullMissing, PullNever:
	default:
		return fmt.Errorf("oci: pull policy %q: want always, missing or never", o.Pull)
	}
	_, err := o.platform()
	return err
}

func (o *Options) progress(e Event) {
	if o.Progress != nil {
		o.Progress(e)
	}
}

// cache returns the layer cache and a cleanup function.
func (o *Options) cache() (*blobcache.Cache, func(), error) {
	if o.CacheDir != "" {
		return &blobcache.Cache{Dir: o.CacheDir}, func() {}, nil
	}
	dir, err := os.MkdirTemp("", "virtkit-layers-")
	if err != nil {
		return nil, nil, fmt.Errorf("oci: %w", err)
	}
	return &blobcache.Cache{Dir: dir}, func() { os.RemoveAll(dir) }, nil
}

// layers makes an image's layers ready for rootfs.Flatten: registry blobs downloaded into the
// cache, every layer's TOC read (from the cache or by a first pass), in parallel. A layer
// downloaded now is decompressed once: the first pass spools its tar into spoolDir (when not
// empty, removed by the caller), and the second pass reads that.
func (im *image) prepare(ctx context.Context, o *Options, c *blobcache.Cache, spoolDir string) ([]rootfs.Layer, error) {
	out := make([]rootfs.Layer, len(im.layers))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(3)
	var mu sync.Mutex // serialises progress events per image
	emit := func(e Event) { mu.Lock(); o.progress(e); mu.Unlock() }
	for i, ld := range im.layers {
		g.Go(func() error {
			l := rootfs.Layer{Digest: ld.digest, DiffID: ld.diffID, Open: ld.open, TOC: ld.toc}
			if ld.remote {
				// The table of contents is read from the download as it streams in (a tee into
				// BuildTOC), so a cold layer is decompressed once before the second pass.
				var tocDone chan tocResult
				var sp *spool
				open := func(ctx context.Context) (io.ReadCloser, error) {
					rc, err := ld.open(ctx)
					if err != nil {
						return nil, err
					}
					pr, pw := io.Pipe()
					tocDone = make(chan tocResult, 1)
					var w io.Writer
					if spoolDir != "" {
						if sp = newSpool(spoolDir, i); sp != nil {
							w = sp
						}
					}
					go func() {
						toc, err := rootfs.BuildTOCSpool(ctx, pr, ld.digest, ld.diffID, o.Limits, w)
						io.Copy(io.Discard, pr) // keep the download flowing after an error
						tocDone <- tocResult{toc, err}
					}()
					return &teeCloser{r: io.TeeReader(rc, pw), rc: rc, pw: pw}, nil
				}
				dl, err := c.Fetch(gctx, ld.digest, ld.size, open, func(n int64) {
					emit(Event{Phase: "fetch", Layer: i, Layers: len(im.layers), Bytes: n, Total: ld.size})
				})
				var tr tocResult
				if tocDone != nil {
					tr = <-tocDone
				}
				spooled := sp.finish()
				if err != nil {
					return fmt.Errorf("oci: %s: layer %d: %w", im.src, i, err)
				}
				if dl {
					o.Log.Debug().Str("layer", ld.digest).Int64("bytes", ld.size).Msg("layer downloaded")
					if tr.err != nil {
						c.Evict(ld.digest) // verified bytes, but not a usable layer: keep nothing
						return fmt.Errorf("oci: %s: layer %d (%s): %w", im.src, i, ld.digest, tr.err)
					}
					if err := c.PutTOC(tr.toc); err != nil {
						o.Log.Warn().Err(err).Msg("layer cache: keep toc")
					}
					l.TOC = tr.toc
				}
				digest := ld.digest
				l.Open = func(context.Context) (io.ReadCloser, error) { return c.Open(digest) }
				if dl && spooled && tr.toc.DiffID != "" {
					// The second pass reads the spooled tar, checked against the diff_id the
					// first pass verified (a plain tar's digest is its diff_id).
					path := sp.path
					l.Digest = tr.toc.DiffID
					l.Open = func(context.Context) (io.ReadCloser, error) { return os.Open(path) }
				}
			}
			if l.TOC != nil {
				if ld.toc != nil {
					if err := c.PutTOC(ld.toc); err != nil {
						o.Log.Warn().Err(err).Msg("layer cache: keep toc")
					}
				}
			} else if toc, ok := c.TOC(ld.digest); ok && (ld.diffID == "" || toc.DiffID == ld.diffID) {
				l.TOC = toc
			} else {
				emit(Event{Phase: "index", Layer: i, Layers: len(im.layers), Total: ld.size})
				toc, err := rootfs.ReadTOC(gctx, l, o.Limits)
				if err != nil {
					if ld.remote && gctx.Err() == nil && !c.Verify(ld.digest) {
						c.Evict(ld.digest)
					}
					return fmt.Errorf("oci: %s: layer %d (%s): %w", im.src, i, ld.digest, err)
				}
				if err := c.PutTOC(toc); err != nil {
					o.Log.Warn().Err(err).Msg("layer cache: keep toc")
				}
				l.TOC = toc
			}
			out[i] = l
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return out, nil
}

// spool is a layer's uncompressed tar written by the first pass (rootfs.BuildTOCSpool); it
// remembers a write error, after which it is not used.
type spool struct {
	path string
	f    *os.File
	bw   *bufio.Writer
	err  error
}

func newSpool(dir string, i int) *spool {
	f, err := os.Create(filepath.Join(dir, fmt.Sprintf("layer-%d.tar", i)))
	if err != nil {
		return nil
	}
	return &spool{path: f.Name(), f: f, bw: bufio.NewWriterSize(f, 1<<20)}
}

func (s *spool) Write(p []byte) (int, error) {
	if s.err == nil {
		_, s.err = s.bw.Write(p)
	}
	return len(p), s.err
}

// finish closes the spool and says whether it is complete; nil is not.
func (s *spool) finish() bool {
	if s == nil || s.f == nil {
		return false
	}
	if s.err == nil {
		s.err = s.bw.Flush()
	}
	if err := s.f.Close(); s.err == nil {
		s.err = err
	}
	s.f = nil
	return s.err == nil
}

type tocResult struct {
	toc *rootfs.TOC
	err error
}

// teeCloser is a download whose bytes are also fed to a TOC builder; closing it ends the feed.
type teeCloser struct {
	r  io.Reader
	rc io.ReadCloser
	pw *io.PipeWriter
}

func (t *teeCloser) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err == io.EOF {
		t.pw.Close()
	} else if err != nil {
		t.pw.CloseWithError(err)
	}
	return n, err
}

func (t *teeCloser) Close() error {
	t.pw.CloseWithError(errors.New("download closed before its end"))
	return t.rc.Close()
}

// flatten writes the image's root filesystem to w, evicting a cached blob that turns out corrupt.
func (im *image) flatten(ctx context.Context, o *Options, c *blobcache.Cache, layers []rootfs.Layer, w io.Writer) (rootfs.Stats, error) {
	tree, err := im.merge(o, layers)
	if err != nil {
		return rootfs.Stats{}, err
	}
	return im.write(ctx, o, c, tree, layers, w)
}

func (im *image) merge(o *Options, layers []rootfs.Layer) (*rootfs.Tree, error) {
	tree, err := rootfs.Merge(tocs(layers), o.Limits)
	if err != nil {
		return nil, fmt.Errorf("oci: %s: %w", im.src, err)
	}
	return tree, nil
}

// write runs the second pass of a merged tree into w.
func (im *image) write(ctx context.Context, o *Options, c *blobcache.Cache, tree *rootfs.Tree, layers []rootfs.Layer, w io.Writer) (rootfs.Stats, error) {
	st := rootfs.Stats{TOCs: tocs(layers)}
	opts := rootfs.Options{Limits: o.Limits, Progress: func(i int, n int64) {
		o.progress(Event{Phase: "flatten", Layer: i, Layers: len(layers), Bytes: n, Total: im.layers[i].size})
	}}
	if err := tree.Write(ctx, layers, w, opts, &st); err != nil {
		if ctx.Err() == nil {
			// A cached blob damaged on disk fails in any number of ways (digest, gzip CRC, tar
			// framing): recheck the image's cached blobs and evict the bad ones, so they are
			// downloaded again next time instead of failing forever.
			for _, l := range im.layers {
				if l.remote && !c.Verify(l.digest) {
					o.Log.Warn().Str("layer", l.digest).Msg("layer cache: evicted a corrupt blob")
					c.Evict(l.digest)
				}
			}
		}
		return st, fmt.Errorf("oci: %s: %w", im.src, err)
	}
	o.progress(Event{Phase: "done", Layers: len(layers)})
	return st, nil
}

func tocs(ls []rootfs.Layer) []*rootfs.TOC {
	out := make([]*rootfs.TOC, len(ls))
	for i, l := range ls {
		out[i] = l.TOC
	}
	return out
}

// Info describes the image a Pull or Convert read.
type Info struct {
	Source         string `json:"source"`
	Reference      string `json:"reference"`
	ManifestDigest string `json:"manifest_digest,omitempty"`
	ConfigDigest   string `json:"config_digest,omitempty"`
	Platform       string `json:"platform,omitempty"`
	Layers         int    `json:"layers"`
	Files          int    `json:"files"`
	Dirs           int    `json:"dirs"`
	Links          int    `json:"links"`
	Bytes          int64  `json:"bytes"`
}

// Pull writes the flattened root filesystem of the image ref names to w as a tar stream.
func Pull(ctx context.Context, ref string, w io.Writer, opts Options) (*Info, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	src, err := ParseSource(ref, opts.Insecure)
	if err != nil {
		return nil, fmt.Errorf("oci: %w", err)
	}
	im, err := resolve(ctx, src, &opts)
	if err != nil {
		return nil, err
	}
	c, done, err := opts.cache()
	if err != nil {
		return nil, err
	}
	defer done()
	spoolDir := ""
	if err := os.MkdirAll(c.Dir, 0o755); err == nil {
		if d, err := os.MkdirTemp(c.Dir, ".spool-"); err == nil {
			spoolDir = d
			defer os.RemoveAll(d)
		}
	}
	layers, err := im.prepare(ctx, &opts, c, spoolDir)
	if err != nil {
		return nil, err
	}
	st, err := im.flatten(ctx, &opts, c, layers, w)
	if err != nil {
		return nil, err
	}
	return &Info{Source: ref, Reference: im.reference, ManifestDigest: im.manifest, ConfigDigest: im.configDigest,
		Platform: im.platform, Layers: len(layers), Files: st.Files, Dirs: st.Dirs, Links: st.Links, Bytes: st.Bytes}, nil
}
