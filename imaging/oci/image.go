package oci

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/virtkit/virtkit/imaging/rootfs"
	"github.com/virtkit/virtkit/imaging/store"
)

// DefaultPlatform is the platform picked from a multi-platform index unless told otherwise.
const DefaultPlatform = "linux/amd64"

// image is a resolved source: its identity, config and layer descriptors, nothing downloaded yet.
type image struct {
	src          Source
	reference    string // canonical, with the digest converted when there is one
	digest       string // what the reference points at (an index or a manifest)
	id           string // identity fingerprints derive from
	manifest     string // manifest digest ("" for docker-archive and tar)
	configDigest string
	config       *v1.ConfigFile
	platform     string
	layers       []layerDesc
}

type layerDesc struct {
	digest, diffID string
	size           int64       // -1 when unknown
	remote         bool        // worth keeping in the layer cache
	toc            *rootfs.TOC // already read while resolving (tar sources)
	open           func(context.Context) (io.ReadCloser, error)
}

func (o *Options) platform() (*v1.Platform, error) {
	s := o.Platform
	if s == "" {
		s = DefaultPlatform
	}
	p, err := v1.ParsePlatform(s)
	if err != nil || p.OS == "" || p.Architecture == "" {
		return nil, fmt.Errorf("platform %q: want os/arch[/variant], like linux/amd64", s)
	}
	return p, nil
}

func (o *Options) remoteOptions(ctx context.Context) []remote.Option {
	kc := o.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	ro := []remote.Option{remote.WithContext(ctx), remote.WithAuthFromKeychain(kc), remote.WithUserAgent("virtkit")}
	if o.Transport != nil {
		ro = append(ro, remote.WithTransport(o.Transport))
	}
	return ro
}

func platformString(p *v1.Platform) string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

// resolve reads a source's manifest and config (and, for a registry, nothing else).
func resolve(ctx context.Context, src Source, o *Options) (*image, error) {
	plat, err := o.platform()
	if err != nil {
		return nil, err
	}
	var im *image
	switch src.Transport {
	case Docker:
		im, err = resolveRemote(ctx, src, o, plat)
	case OCILayout:
		im, err = resolveLayout(src, plat)
	case DockerArchive:
		im, err = resolveArchive(src)
	case Tarball:
		im, err = resolveTar(ctx, src, o.Limits)
	default:
		err = fmt.Errorf("unknown transport %q", src.Transport)
	}
	if err != nil {
		return nil, fmt.Errorf("oci: %s: %w", src, err)
	}
	if im.platform == "" {
		im.platform = platformString(plat)
	}
	return im, nil
}

func resolveRemote(ctx context.Context, src Source, o *Options, plat *v1.Platform) (*image, error) {
	ref, err := src.reference(o.Insecure)
	if err != nil {
		return nil, err
	}
	desc, err := remote.Get(ref, o.remoteOptions(ctx)...)
	if err != nil {
		return nil, fmt.Errorf("get manifest: %w", err)
	}
	if got := sha(desc.Manifest); got != desc.Digest.String() {
		return nil, fmt.Errorf("manifest is %s, the registry says %s: %w", got, desc.Digest, errDigest)
	}
	im := &image{src: src, digest: desc.Digest.String(), reference: ref.Context().Digest(desc.Digest.String()).String()}
	var img v1.Image
	switch {
	case desc.MediaType.IsIndex():
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, err
		}
		child, err := pick(idx, plat)
		if err != nil {
			return nil, err
		}
		if img, err = idx.Image(child.Digest); err != nil {
			return nil, fmt.Errorf("get %s manifest %s: %w", platformString(plat), child.Digest, err)
		}
		im.platform = platformString(plat)
	case desc.MediaType.IsImage():
		if img, err = desc.Image(); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%w: unsupported manifest media type %q", ErrInvalid, desc.MediaType)
	}
	if err := im.fill(img, true); err != nil {
		return nil, err
	}
	return im, nil
}

// pick chooses the manifest of a platform in an index.
func pick(idx v1.ImageIndex, plat *v1.Platform) (*v1.Descriptor, error) {
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("read index: %w", err)
	}
	var have []string
	for i := range m.Manifests {
		d := &m.Manifests[i]
		if d.Platform == nil {
			continue
		}
		have = append(have, platformString(d.Platform))
		if d.Platform.OS == plat.OS && d.Platform.Architecture == plat.Architecture &&
			(plat.Variant == "" || d.Platform.Variant == plat.Variant) && d.MediaType.IsImage() {
			return d, nil
		}
	}
	sort.Strings(have)
	return nil, fmt.Errorf("%w: no image for platform %s in the index (it has: %s)", ErrInvalid, platformString(plat), strings.Join(have, ", "))
}

func resolveLayout(src Source, plat *v1.Platform) (*image, error) {
	lp, err := layout.FromPath(src.Path)
	if err != nil {
		return nil, fmt.Errorf("open layout: %w", err)
	}
	idx, err := lp.ImageIndex()
	if err != nil {
		return nil, fmt.Errorf("read index.json: %w", err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("read index.json: %w", err)
	}
	var found []v1.Descriptor
	var names []string
	for _, d := range m.Manifests {
		n := d.Annotations["org.opencontainers.image.ref.name"]
		names = append(names, n)
		if src.Tag == "" || n == src.Tag {
			found = append(found, d)
		}
	}
	switch {
	case len(found) == 0 && src.Tag != "":
		return nil, fmt.Errorf("no image named %q in index.json (names: %s)", src.Tag, strings.Join(names, ", "))
	case len(found) == 0:
		return nil, errors.New("index.json lists no image")
	case len(found) > 1:
		return nil, fmt.Errorf("index.json lists %d images: name one with oci:PATH:NAME (names: %s)", len(found), strings.Join(names, ", "))
	}
	d := found[0]
	im := &image{src: src, digest: d.Digest.String(), reference: src.String() + "@" + d.Digest.String()}
	var img v1.Image
	switch {
	case d.MediaType.IsIndex():
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, err
		}
		raw, err := child.RawManifest()
		if err != nil {
			return nil, err
		}
		if got := sha(raw); got != d.Digest.String() {
			return nil, fmt.Errorf("index %s has content %s: %w", d.Digest, got, errDigest)
		}
		cd, err := pick(child, plat)
		if err != nil {
			return nil, err
		}
		if img, err = child.Image(cd.Digest); err != nil {
			return nil, err
		}
		im.platform = platformString(plat)
	case d.MediaType.IsImage():
		if img, err = idx.Image(d.Digest); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%w: unsupported manifest media type %q", ErrInvalid, d.MediaType)
	}
	if err := im.fill(img, false); err != nil {
		return nil, err
	}
	return im, nil
}

// fill reads a manifest-based image's manifest and config, checking their digests, and describes
// its layers.
func (im *image) fill(img v1.Image, remote bool) error {
	raw, err := img.RawManifest()
	if err != nil {
		return fmt.Errorf("read manifest: %w", err)
	}
	mdig, err := img.Digest()
	if err != nil {
		return fmt.Errorf("read manifest: %w", err)
	}
	if got := sha(raw); got != mdig.String() {
		return fmt.Errorf("manifest %s has content %s: %w", mdig, got, errDigest)
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return fmt.Errorf("%w: parse manifest: %w", ErrInvalid, err)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	if got := sha(rawCfg); got != m.Config.Digest.String() {
		return fmt.Errorf("config blob is %s, the manifest says %s: %w", got, m.Config.Digest, errDigest)
	}
	if m.Config.Size != int64(len(rawCfg)) {
		return fmt.Errorf("config blob is %d bytes, the manifest says %d: %w", len(rawCfg), m.Config.Size, errDigest)
	}
	cfg, err := parseConfig(rawCfg, len(m.Layers))
	if err != nil {
		return err
	}
	im.id, im.manifest, im.configDigest, im.config = mdig.String(), mdig.String(), m.Config.Digest.String(), cfg
	if im.platform == "" && cfg.OS != "" {
		im.platform = platformString(&v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant})
	}
	for i, l := range m.Layers {
		if err := checkLayerType(l.MediaType); err != nil {
			return fmt.Errorf("%w: layer %d (%s): %w", ErrInvalid, i, l.Digest, err)
		}
		if l.Size < 0 {
			return fmt.Errorf("%w: layer %d (%s): negative size %d", ErrInvalid, i, l.Digest, l.Size)
		}
		h := l.Digest
		im.layers = append(im.layers, layerDesc{
			digest: h.String(), diffID: cfg.RootFS.DiffIDs[i].String(), size: l.Size, remote: remote,
			open: func(context.Context) (io.ReadCloser, error) {
				layer, err := img.LayerByDigest(h)
				if err != nil {
					return nil, err
				}
				return layer.Compressed()
			},
		})
	}
	return nil
}

func checkLayerType(mt types.MediaType) error {
	switch mt {
	case types.DockerLayer, types.OCILayer, types.OCIUncompressedLayer, types.OCILayerZStd, types.DockerUncompressedLayer,
		"":
		return nil
	case types.DockerForeignLayer, types.OCIRestrictedLayer, types.OCIUncompressedRestrictedLayer:
		return fmt.Errorf("non-distributable (foreign) layer %q is not supported", mt)
	}
	return fmt.Errorf("unsupported layer media type %q", mt)
}

// parseConfig parses an image config and checks it describes nLayers layers.
func parseConfig(raw []byte, nLayers int) (*v1.ConfigFile, error) {
	cfg, err := v1.ParseConfigFile(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("%w: parse config: %w", ErrInvalid, err)
	}
	if n := len(cfg.RootFS.DiffIDs); n != nLayers {
		return nil, fmt.Errorf("%w: config lists %d diff_ids for %d layers", ErrInvalid, n, nLayers)
	}
	for i, d := range cfg.RootFS.DiffIDs {
		if d.Algorithm != "sha256" || len(d.Hex) != 64 {
			return nil, fmt.Errorf("%w: config diff_id %d %q: not a sha256 digest", ErrInvalid, i, d)
		}
	}
	return cfg, nil
}

func resolveArchive(src Source) (*image, error) {
	var tag *name.Tag
	if src.Tag != "" {
		t, err := name.NewTag(src.Tag)
		if err != nil {
			return nil, fmt.Errorf("archive image name %q: %w", src.Tag, err)
		}
		tag = &t
	}
	img, err := tarball.ImageFromPath(src.Path, tag)
	if err != nil {
		return nil, fmt.Errorf("open archive: %w", err)
	}
	cname, err := img.ConfigName()
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if got := sha(rawCfg); got != cname.String() {
		return nil, fmt.Errorf("config is %s, the archive names it %s: %w", got, cname, errDigest)
	}
	cfgNoLayers, err := v1.ParseConfigFile(bytes.NewReader(rawCfg))
	if err != nil {
		return nil, fmt.Errorf("parse config: %w", err)
	}
	cfg, err := parseConfig(rawCfg, len(cfgNoLayers.RootFS.DiffIDs))
	if err != nil {
		return nil, err
	}
	im := &image{src: src, digest: cname.String(), id: cname.String(), configDigest: cname.String(), config: cfg,
		reference: src.String() + "@" + cname.String()}
	if cfg.OS != "" {
		im.platform = platformString(&v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant})
	}
	for _, d := range cfg.RootFS.DiffIDs {
		h := d
		// The archive's layers are read uncompressed and checked against the config's diff_ids:
		// asking go-containerregistry for compressed digests would gzip every layer first.
		im.layers = append(im.layers, layerDesc{digest: h.String(), diffID: h.String(), size: -1,
			open: func(context.Context) (io.ReadCloser, error) {
				l, err := img.LayerByDiffID(h)
				if err != nil {
					return nil, err
				}
				return l.Uncompressed()
			}})
	}
	return im, nil
}

func resolveTar(ctx context.Context, src Source, lim rootfs.Limits) (*image, error) {
	f, err := os.Open(src.Path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	// One read gives both the identity (the file's digest) and the table of contents.
	toc, err := rootfs.BuildTOC(ctx, f, "", "", lim)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	d := toc.Digest
	path := src.Path
	return &image{src: src, digest: d, id: d, reference: src.String() + "@" + d, config: &v1.ConfigFile{},
		layers: []layerDesc{{digest: d, size: toc.Size, toc: toc, open: func(context.Context) (io.ReadCloser, error) { return os.Open(path) }}}}, nil
}

var errDigest = errors.New("digest mismatch")

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// imageConfig is what the store keeps of an image.
func (im *image) imageConfig(given string) *store.ImageConfig {
	c := &store.ImageConfig{Source: given, Reference: im.reference, ManifestDigest: im.manifest,
		ConfigDigest: im.configDigest, Platform: im.platform}
	if im.config == nil {
		return c
	}
	cc := im.config.Config
	c.Entrypoint, c.Cmd, c.Env, c.WorkingDir, c.User = cc.Entrypoint, cc.Cmd, cc.Env, cc.WorkingDir, cc.User
	c.Labels, c.StopSignal = cc.Labels, cc.StopSignal
	for p := range cc.ExposedPorts {
		c.ExposedPorts = append(c.ExposedPorts, p)
	}
	sort.Strings(c.ExposedPorts)
	for v := range cc.Volumes {
		c.Volumes = append(c.Volumes, v)
	}
	sort.Strings(c.Volumes)
	if !im.config.Created.IsZero() {
		c.Created = im.config.Created.UTC().Format("2006-01-02T15:04:05Z07:00")
	}
	return c
}
