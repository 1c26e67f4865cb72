package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/virtkit/virtkit/imaging/blobcache"
	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/rootfs"
	"github.com/virtkit/virtkit/imaging/store"
)

// ConverterVersion changes whenever Convert would build a different bundle from the same inputs;
// it is part of every fingerprint. 2: the filesystem UUID derives from the fingerprint.
const ConverterVersion = 2

// AgentPath is where Convert injects the guest agent; ImageConfigPath where it puts image.json.
const (
	AgentPath       = "/sbin/virtkit-agent"
	ImageConfigPath = "/.virtkit/image.json"
)

// ConvertOptions configure Convert. Store and Agent are required.
type ConvertOptions struct {
	Options
	// Store is the bundle store folder (e.g. <state>/images).
	Store string
	// Agent is the virtkit-agent binary to inject as /sbin/virtkit-agent.
	Agent string
	// Size is the ext4 image size in bytes; 0 sizes it to the content plus Free.
	Size int64
	// Free is the free space to leave when Size is 0; 0 takes the writer's default.
	Free int64
	// NoJournal leaves out the ext4 journal (the base image is mounted read-only anyway).
	NoJournal bool
	// TwoPass makes single-layer images go through the two-pass flattener too (tests compare the
	// paths); by default a single layer is streamed into the writer in one pass (rootfs.Stream).
	TwoPass bool
}

// ErrNotPresent is returned (wrapped) under pull policy "never" for an image this host has not got.
var ErrNotPresent = errors.New("image not present locally (pull policy never)")

// Convert returns the bundle of the image ref names, building it when the store has none:
// an ext4 root filesystem (the flattened image, the agent at /sbin/virtkit-agent and the image
// config at /.virtkit/image.json) and image.json beside it. A second Convert of the same image
// with the same options is a cache hit: no layer is read, and no network is used when ref names a
// digest or the pull policy lets a known tag be trusted.
func Convert(ctx context.Context, ref string, opts ConvertOptions) (*store.Bundle, error) {
	b, _, err := convert(ctx, ref, opts)
	return b, err
}

// ConvertStatus is Convert that also says whether this call built the bundle.
func ConvertStatus(ctx context.Context, ref string, opts ConvertOptions) (*store.Bundle, bool, error) {
	return convert(ctx, ref, opts)
}

func convert(ctx context.Context, ref string, opts ConvertOptions) (*store.Bundle, bool, error) {
	o := &opts.Options
	if err := o.check(); err != nil {
		return nil, false, err
	}
	if opts.Store == "" || opts.Agent == "" {
		return nil, false, errors.New("oci: convert: the store folder and the agent binary are required")
	}
	src, err := ParseSource(ref, o.Insecure)
	if err != nil {
		return nil, false, fmt.Errorf("oci: %w", err)
	}
	st, err := store.Open(opts.Store)
	if err != nil {
		return nil, false, err
	}
	agentSum, err := agentDigest(st, opts.Agent)
	if err != nil {
		return nil, false, fmt.Errorf("oci: agent: %w", err)
	}
	plat, err := o.platform()
	if err != nil {
		return nil, false, err
	}
	key := refKey(src, platformString(plat))
	// The fast path: a resolution this host already trusts, and its bundle.
	if id, ok := quickID(ctx, st, src, key, o); ok {
		if b, err := st.Get(fingerprint(id, agentSum, &opts)); err == nil {
			o.Log.Debug().Str("image", ref).Str("bundle", b.Fingerprint).Msg("bundle cache hit")
			return b, false, nil
		}
	} else if o.Pull == PullNever && src.Transport == Docker {
		return nil, false, fmt.Errorf("oci: %s: %w", src, ErrNotPresent)
	}
	im, err := resolve(ctx, src, o)
	if err != nil {
		return nil, false, err
	}
	if key != "" {
		if err := st.SetRef(key, store.Ref{Source: src.String(), Platform: platformString(plat), Digest: im.digest, ID: im.id, Time: time.Now()}); err != nil {
			o.Log.Warn().Err(err).Msg("record image resolution")
		}
	}
	fp := fingerprint(im.id, agentSum, &opts)
	return st.Build(ctx, fp, func(ctx context.Context, dir string) (*store.ImageConfig, error) {
		cfg := im.imageConfig(ref)
		if err := build(ctx, im, cfg, dir, &opts, bundleUUID(fp)); err != nil {
			return nil, err
		}
		return cfg, nil
	})
}

// build writes dir/rootfs.ext4: the layers flattened and streamed through a pipe into the writer.
// The filesystem gets uuid: the bundle is already named by what decides its bytes (the manifest
// digest, verified blob by blob, and the options), so the writer need not hash the flattened
// root filesystem a second time to name it.
func build(ctx context.Context, im *image, cfg *store.ImageConfig, dir string, opts *ConvertOptions, uuid string) error {
	o := &opts.Options
	c, done, err := o.cache()
	if err != nil {
		return err
	}
	defer done()
	cfgJSON, err := store.MarshalImageConfig(cfg)
	if err != nil {
		return err
	}
	cfgFile := filepath.Join(dir, "image.json")
	if err := os.WriteFile(cfgFile, cfgJSON, 0o644); err != nil {
		return fmt.Errorf("oci: %w", err)
	}
	if len(im.layers) == 1 && !opts.TwoPass {
		return buildStream(ctx, im, cfgJSON, dir, opts, c, uuid)
	}
	spoolDir, err := os.MkdirTemp(dir, ".layers-") // removed before the bundle is published
	if err != nil {
		return fmt.Errorf("oci: %w", err)
	}
	defer os.RemoveAll(spoolDir)
	layers, err := im.prepare(ctx, o, c, spoolDir)
	if err != nil {
		return err
	}
	tree, err := im.merge(o, layers)
	if err != nil {
		return err
	}
	// Inject where the paths really live: on a usrmerged image /sbin is a symlink to usr/sbin,
	// and the agent must land in usr/sbin rather than replace the symlink with a directory.
	agentDst, err := tree.Resolve(AgentPath)
	if err != nil {
		return fmt.Errorf("oci: %w", err)
	}
	cfgDst, err := tree.Resolve(ImageConfigPath)
	if err != nil {
		return fmt.Errorf("oci: %w", err)
	}
	pr, pw := io.Pipe()
	flat := make(chan error, 1)
	go func() {
		_, err := im.write(ctx, o, c, tree, layers, pw)
		pw.CloseWithError(err)
		flat <- err
	}()
	res, werr := ext4.WriteTar(ctx, pr, filepath.Join(dir, "rootfs.ext4"), ext4.Options{
		Size: opts.Size, Free: opts.Free, NoJournal: opts.NoJournal, UUID: uuid,
		Inject: []ext4.Inject{
			{Src: opts.Agent, Dst: "/" + agentDst, Mode: 0o755},
			{Src: cfgFile, Dst: "/" + cfgDst, Mode: 0o644},
		},
	})
	pr.CloseWithError(errors.New("ext4 writer stopped reading"))
	ferr := <-flat
	if ferr != nil {
		return ferr
	}
	if werr != nil {
		return fmt.Errorf("oci: %s: write ext4: %w", im.src, werr)
	}
	if err := os.WriteFile(filepath.Join(dir, store.UUIDName), []byte(res.UUID+"\n"), 0o644); err != nil {
		return fmt.Errorf("oci: %w", err)
	}
	return nil
}

// quickID returns the image identity of a source without reading the image, when the pull policy
// allows trusting what is known: a digest reference resolved before, a tag resolved before (pull
// missing or never), a tag whose registry digest did not change (pull always, one HEAD request),
// or a tar file whose size, mtime and inode did not change.
func quickID(ctx context.Context, st *store.Store, src Source, key string, o *Options) (string, bool) {
	if key == "" {
		return "", false
	}
	r, ok := st.Ref(key)
	if !ok {
		return "", false
	}
	if src.Transport != Docker {
		return r.ID, true
	}
	ref, err := src.reference(o.Insecure)
	if err != nil {
		return "", false
	}
	if _, isDigest := ref.(name.Digest); isDigest || o.Pull != PullAlways {
		return r.ID, true
	}
	d, err := remote.Head(ref, o.remoteOptions(ctx)...)
	if err != nil || d.Digest.String() != r.Digest {
		return "", false
	}
	return r.ID, true
}

// refKey names a source's resolution record; "" when the source is not worth recording (an OCI
// layout or an archive is read in milliseconds and may change in place).
func refKey(src Source, platform string) string {
	var s string
	switch src.Transport {
	case Docker:
		s = src.String() + "\n" + platform
	case Tarball:
		fi, err := os.Stat(src.Path)
		if err != nil {
			return ""
		}
		s = fmt.Sprintf("%s\n%d\n%d\n%d", src.Path, fi.Size(), fi.ModTime().UnixNano(), inode(fi))
	default:
		return ""
	}
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:16])
}

// fingerprint names a bundle: everything that decides its bytes.
func fingerprint(id, agentSum string, opts *ConvertOptions) string {
	in, _ := json.Marshal(struct {
		Converter, Writer int
		ID, Agent         string
		Size, Free        int64
		NoJournal         bool
	}{ConverterVersion, ext4.FormatVersion, id, agentSum, opts.Size, opts.Free, opts.NoJournal})
	h := sha256.Sum256(in)
	return hex.EncodeToString(h[:])
}

// bundleUUID is the filesystem UUID of the bundle named fp: its first 128 bits, marked as an
// RFC 9562 version 8 (custom) UUID.
func bundleUUID(fp string) string {
	u, _ := hex.DecodeString(fp[:32])
	u[6] = u[6]&0x0f | 0x80
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// agentDigest is the agent binary's digest, remembered by path, size, mtime and inode so that a
// cache hit does not hash megabytes.
func agentDigest(st *store.Store, path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	abs, _ := filepath.Abs(path)
	h := sha256.Sum256([]byte(fmt.Sprintf("agent\n%s\n%d\n%d\n%d", abs, fi.Size(), fi.ModTime().UnixNano(), inode(fi))))
	key := hex.EncodeToString(h[:16])
	if r, ok := st.Ref(key); ok {
		return r.ID, nil
	}
	d, err := fileDigest(path)
	if err != nil {
		return "", err
	}
	_ = st.SetRef(key, store.Ref{Source: abs, ID: d, Time: time.Now()})
	return d, nil
}

func fileDigest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// FindAgent returns the virtkit-agent to inject: next to the running executable (dist/ has both),
// else on $PATH.
func FindAgent() (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "virtkit-agent")
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	for _, d := range filepath.SplitList(os.Getenv("PATH")) {
		p := filepath.Join(d, "virtkit-agent")
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", errors.New("oci: no virtkit-agent next to virtkit or on $PATH (give --agent PATH)")
}

func inode(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// buildStream converts a single-layer image in one pass: the layer is read once (while it
// downloads, when it is not cached yet), flattened by rootfs.StreamTo straight into an
// ext4.Writer (no tar stream in between), with the agent and image.json added where their paths
// resolve in the image. The blob and its TOC are cached as in the two-pass path; a digest mismatch
// found at the end of the stream fails the build, so nothing unverified is published.
func buildStream(ctx context.Context, im *image, cfgJSON []byte, dir string, opts *ConvertOptions, c *blobcache.Cache, uuid string) error {
	o := &opts.Options
	ld := im.layers[0]
	agent, err := os.ReadFile(opts.Agent)
	if err != nil {
		return fmt.Errorf("oci: agent: %w", err)
	}
	w, err := ext4.Create(ctx, filepath.Join(dir, "rootfs.ext4"), ext4.Options{Size: opts.Size, Free: opts.Free, NoJournal: opts.NoJournal, UUID: uuid})
	if err != nil {
		return fmt.Errorf("oci: %s: write ext4: %w", im.src, err)
	}
	defer w.Abort() // after Close: nothing
	produce := func(r io.Reader, verified bool) error {
		l := rootfs.Layer{Digest: ld.digest, DiffID: ld.diffID}
		add := func(hd *tar.Header, data io.Reader) error {
			// As a tar stream without an explicit format carries it (and the two-pass path's does).
			hd.ModTime = hd.ModTime.Round(time.Second)
			return w.Add(hd, data)
		}
		toc, tree, err := rootfs.StreamTo(ctx, r, l, add, rootfs.Options{Limits: o.Limits, BlobVerified: verified})
		if err != nil {
			return fmt.Errorf("oci: %s: %w", im.src, err)
		}
		if ld.remote || ld.toc == nil {
			if err := c.PutTOC(toc); err != nil {
				o.Log.Warn().Err(err).Msg("layer cache: keep toc")
			}
		}
		for _, f := range []struct {
			path string
			data []byte
			mode int64
		}{{AgentPath, agent, 0o755}, {ImageConfigPath, cfgJSON, 0o644}} {
			dst, err := tree.Resolve(f.path)
			if err != nil {
				return fmt.Errorf("oci: %w", err)
			}
			h := &tar.Header{Name: dst, Typeflag: tar.TypeReg, Mode: f.mode, Size: int64(len(f.data)), ModTime: time.Unix(0, 0)}
			if err := w.Add(h, bytes.NewReader(f.data)); err != nil {
				return fmt.Errorf("oci: inject %s: %w", f.path, err)
			}
		}
		return nil
	}
	if err := streamLayer(ctx, im, o, c, produce); err != nil {
		return err
	}
	res, err := w.Close()
	if err != nil {
		return fmt.Errorf("oci: %s: write ext4: %w", im.src, err)
	}
	o.progress(Event{Phase: "done", Layers: 1})
	if err := os.WriteFile(filepath.Join(dir, store.UUIDName), []byte(res.UUID+"\n"), 0o644); err != nil {
		return fmt.Errorf("oci: %w", err)
	}
	return nil
}

// streamLayer gives produce the single layer's blob: straight from the download (teed into the
// cache, whose digest check fails the conversion: verified is true) when it is not cached, else
// from the cache or the local source.
func streamLayer(ctx context.Context, im *image, o *Options, c *blobcache.Cache, produce func(r io.Reader, verified bool) error) error {
	ld := im.layers[0]
	progress := func(n int64) { o.progress(Event{Phase: "fetch", Layer: 0, Layers: 1, Bytes: n, Total: ld.size}) }
	if ld.remote {
		var res chan error
		open := func(ctx context.Context) (io.ReadCloser, error) {
			rc, err := ld.open(ctx)
			if err != nil {
				return nil, err
			}
			r, w := io.Pipe()
			res = make(chan error, 1)
			go func() {
				err := produce(r, true)
				r.CloseWithError(errors.New("layer consumer stopped"))
				res <- err
			}()
			return &teeCloser{r: io.TeeReader(rc, w), rc: rc, pw: w}, nil
		}
		_, err := c.Fetch(ctx, ld.digest, ld.size, open, progress)
		if res != nil {
			if perr := <-res; perr != nil {
				// The consumer's error is the cause (a download error reaches it through the pipe).
				if err == nil && ctx.Err() == nil && !c.Verify(ld.digest) {
					c.Evict(ld.digest)
				}
				return perr
			}
		}
		if err != nil {
			return fmt.Errorf("oci: %s: layer 0: %w", im.src, err)
		}
		if res != nil {
			return nil // streamed while downloading
		}
		f, err := c.Open(ld.digest)
		if err != nil {
			return fmt.Errorf("oci: %s: layer 0: %w", im.src, err)
		}
		defer f.Close()
		if err := produce(&progressReader{r: f, fn: progress}, false); err != nil {
			if ctx.Err() == nil && !c.Verify(ld.digest) {
				c.Evict(ld.digest)
			}
			return err
		}
		return nil
	}
	rc, err := ld.open(ctx)
	if err != nil {
		return fmt.Errorf("oci: %s: layer 0: %w", im.src, err)
	}
	defer rc.Close()
	return produce(&progressReader{r: rc, fn: progress}, false)
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
