package oci

import (
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

	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/store"
)

// ConverterVersion changes whenever Convert would build a different bundle from the same inputs;
// it is part of every fingerprint.
const ConverterVersion = 1

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
	agentSum, err := fileDigest(opts.Agent)
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
	} else if o.Pull == PullNever {
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
		if err := build(ctx, im, cfg, dir, &opts); err != nil {
			return nil, err
		}
		return cfg, nil
	})
}

// build writes dir/rootfs.ext4: the layers flattened and streamed through a pipe into the writer.
func build(ctx context.Context, im *image, cfg *store.ImageConfig, dir string, opts *ConvertOptions) error {
	o := &opts.Options
	c, done, err := o.cache()
	if err != nil {
		return err
	}
	defer done()
	layers, err := im.prepare(ctx, o, c)
	if err != nil {
		return err
	}
	cfgJSON, err := store.MarshalImageConfig(cfg)
	if err != nil {
		return err
	}
	cfgFile := filepath.Join(dir, "image.json")
	if err := os.WriteFile(cfgFile, cfgJSON, 0o644); err != nil {
		return fmt.Errorf("oci: %w", err)
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
		Size: opts.Size, Free: opts.Free, NoJournal: opts.NoJournal,
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
