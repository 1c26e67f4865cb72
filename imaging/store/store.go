// Package store is the content-addressed store of bootable image bundles: one folder per bundle,
// named by its fingerprint (a digest of everything that went into it), holding rootfs.ext4 and
// image.json.
//
// Building is safe across processes and across hosts that share the folder: the builder of a
// fingerprint holds an exclusive flock on <dir>/.locks/<fingerprint>, writes into a private
// temporary folder and renames it into place, so a bundle folder either does not exist or is
// complete. A second builder of the same fingerprint waits for the lock and then finds the bundle.
// Store methods are safe for concurrent use.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/virtkit/virtkit/internal/flock"
)

// ImageConfig is what a guest needs to run an image, taken from its OCI config, and where it came
// from. It is written beside the rootfs as image.json and inside it as /.virtkit/image.json, where
// the guest agent reads it in entrypoint mode.
type ImageConfig struct {
	Entrypoint   []string          `json:"entrypoint,omitempty"`
	Cmd          []string          `json:"cmd,omitempty"`
	Env          []string          `json:"env,omitempty"`
	WorkingDir   string            `json:"workdir,omitempty"`
	User         string            `json:"user,omitempty"`
	ExposedPorts []string          `json:"exposed_ports,omitempty"` // "80/tcp", sorted
	Volumes      []string          `json:"volumes,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	StopSignal   string            `json:"stop_signal,omitempty"`

	// Source is the reference as given ("docker://…", "oci:…", …); Reference its canonical form
	// with the digest that was converted.
	Source    string `json:"source"`
	Reference string `json:"reference,omitempty"`
	// ManifestDigest is the digest of the image manifest (of the chosen platform for an index);
	// empty for sources that have none (docker-archive, tar).
	ManifestDigest string `json:"manifest_digest,omitempty"`
	ConfigDigest   string `json:"config_digest,omitempty"`
	Platform       string `json:"platform,omitempty"`
	Created        string `json:"created,omitempty"`
}

// Bundle is one converted image in the store.
type Bundle struct {
	Dir         string      `json:"dir"`
	Rootfs      string      `json:"rootfs"`
	Image       ImageConfig `json:"image"`
	Fingerprint string      `json:"fingerprint"`
	// FSUUID is the ext4 filesystem UUID (derived from the build inputs), when the builder left
	// it in the bundle's fsuuid file.
	FSUUID string `json:"fs_uuid,omitempty"`
	// Size is the rootfs file's apparent size; Used the last time the bundle was built or hit.
	Size int64     `json:"size"`
	Used time.Time `json:"used"`
}

const (
	rootfsName = "rootfs.ext4"
	configName = "image.json"
	usedName   = "used"
)

// UUIDName is the optional file of a bundle holding its filesystem UUID.
const UUIDName = "fsuuid"

var fpRE = regexp.MustCompile(`^[0-9a-f]{16,128}$`)

// ErrNotFound is returned (wrapped) for a fingerprint that has no bundle.
var ErrNotFound = errors.New("no such bundle")

// Store is a bundle store rooted at Dir.
type Store struct {
	Dir string
}

// Open makes the store's folders.
func Open(dir string) (*Store, error) {
	for _, d := range []string{dir, filepath.Join(dir, ".locks"), filepath.Join(dir, ".tmp")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
	}
	return &Store{Dir: dir}, nil
}

func checkFP(fp string) error {
	if !fpRE.MatchString(fp) {
		return fmt.Errorf("store: fingerprint %q: want 16 to 128 lower-case hex digits", fp)
	}
	return nil
}

// Get returns the bundle of a fingerprint and marks it used, or an error wrapping ErrNotFound.
func (s *Store) Get(fp string) (*Bundle, error) {
	if err := checkFP(fp); err != nil {
		return nil, err
	}
	b, err := s.read(fp)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	_ = os.Chtimes(filepath.Join(b.Dir, usedName), now, now)
	b.Used = now
	return b, nil
}

func (s *Store) read(fp string) (*Bundle, error) {
	dir := filepath.Join(s.Dir, fp)
	data, err := os.ReadFile(filepath.Join(dir, configName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("store: bundle %s: %w", fp, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("store: bundle %s: %w", fp, err)
	}
	cfg, err := ParseImageConfig(data)
	if err != nil {
		return nil, fmt.Errorf("store: bundle %s: %w", fp, err)
	}
	b := &Bundle{Dir: dir, Rootfs: filepath.Join(dir, rootfsName), Image: *cfg, Fingerprint: fp}
	fi, err := os.Stat(b.Rootfs)
	if err != nil {
		return nil, fmt.Errorf("store: bundle %s: %w", fp, err)
	}
	b.Size = fi.Size()
	if u, err := os.ReadFile(filepath.Join(dir, UUIDName)); err == nil {
		b.FSUUID = strings.TrimSpace(string(u))
	}
	if fi, err := os.Stat(filepath.Join(dir, usedName)); err == nil {
		b.Used = fi.ModTime()
	}
	return b, nil
}

// ParseImageConfig decodes an image.json, rejecting unknown fields and trailing data.
func ParseImageConfig(data []byte) (*ImageConfig, error) {
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	var c ImageConfig
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("parse image.json: %w", err)
	}
	if dec.More() {
		return nil, errors.New("parse image.json: trailing data")
	}
	return &c, nil
}

// MarshalImageConfig encodes an image.json (indented, stable).
func MarshalImageConfig(c *ImageConfig) ([]byte, error) {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode image.json: %w", err)
	}
	return append(b, '\n'), nil
}

// BuildFunc writes rootfs.ext4 into dir and returns the image config to store with it.
type BuildFunc func(ctx context.Context, dir string) (*ImageConfig, error)

// Build returns the bundle of fp, running build to make it when it does not exist yet. Concurrent
// Builds of one fingerprint, in this process or others sharing the folder, run build once; the
// others wait and get its result. built says whether this call ran build. A failed build leaves
// nothing behind.
func (s *Store) Build(ctx context.Context, fp string, build BuildFunc) (b *Bundle, built bool, err error) {
	if err := checkFP(fp); err != nil {
		return nil, false, err
	}
	if b, err := s.Get(fp); err == nil {
		return b, false, nil
	}
	unlock, err := s.lock(ctx, fp)
	if err != nil {
		return nil, false, err
	}
	defer unlock()
	if b, err := s.Get(fp); err == nil {
		return b, false, nil
	}
	tmp, err := os.MkdirTemp(filepath.Join(s.Dir, ".tmp"), fp[:16]+"-")
	if err != nil {
		return nil, false, fmt.Errorf("store: %w", err)
	}
	defer os.RemoveAll(tmp)
	cfg, err := build(ctx, tmp)
	if err != nil {
		return nil, false, err
	}
	data, err := MarshalImageConfig(cfg)
	if err != nil {
		return nil, false, err
	}
	if err := os.WriteFile(filepath.Join(tmp, configName), data, 0o644); err != nil {
		return nil, false, fmt.Errorf("store: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, usedName), nil, 0o644); err != nil {
		return nil, false, fmt.Errorf("store: %w", err)
	}
	if _, err := os.Stat(filepath.Join(tmp, rootfsName)); err != nil {
		return nil, false, fmt.Errorf("store: build of %s made no %s: %w", fp, rootfsName, err)
	}
	if err := syncDir(tmp); err != nil {
		return nil, false, err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, false, fmt.Errorf("store: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(s.Dir, fp)); err != nil {
		return nil, false, fmt.Errorf("store: publish bundle %s: %w", fp, err)
	}
	if err := syncDir(s.Dir); err != nil {
		return nil, false, err
	}
	b, err = s.Get(fp)
	return b, err == nil, err
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("store: sync %s: %w", dir, err)
	}
	return nil
}

// lock takes the exclusive build lock of fp; ending ctx ends the wait.
func (s *Store) lock(ctx context.Context, fp string) (func(), error) {
	unlock, err := flock.Lock(ctx, filepath.Join(s.Dir, ".locks", fp))
	if err != nil {
		if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
			return nil, fmt.Errorf("store: wait for the build of %s: %w", fp, err)
		}
		return nil, fmt.Errorf("store: lock %s: %w", fp, err)
	}
	return unlock, nil
}

// List returns the bundles, most recently used first. Folders that are not complete bundles
// (someone else's, or damaged) are skipped.
func (s *Store) List() ([]*Bundle, error) {
	ents, err := os.ReadDir(s.Dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("store: %w", err)
	}
	var out []*Bundle
	for _, e := range ents {
		if !e.IsDir() || checkFP(e.Name()) != nil {
			continue
		}
		b, err := s.read(e.Name())
		if err != nil {
			continue
		}
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Used.Equal(out[j].Used) {
			return out[i].Used.After(out[j].Used)
		}
		return out[i].Fingerprint < out[j].Fingerprint
	})
	return out, nil
}

// Remove deletes a bundle. It waits for a build of the same fingerprint to finish first.
func (s *Store) Remove(ctx context.Context, fp string) error {
	if err := checkFP(fp); err != nil {
		return err
	}
	unlock, err := s.lock(ctx, fp)
	if err != nil {
		return err
	}
	defer unlock()
	dir := filepath.Join(s.Dir, fp)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("store: remove %s: %w", fp, ErrNotFound)
	}
	// Rename first so that a reader never sees a half-deleted bundle.
	trash, err := os.MkdirTemp(filepath.Join(s.Dir, ".tmp"), "rm-")
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if err := os.Rename(dir, filepath.Join(trash, fp)); err != nil {
		os.Remove(trash)
		return fmt.Errorf("store: remove %s: %w", fp, err)
	}
	if err := os.RemoveAll(trash); err != nil {
		return fmt.Errorf("store: remove %s: %w", fp, err)
	}
	return nil
}

// Prune keeps the keep most recently used bundles and removes the others, returning them.
func (s *Store) Prune(ctx context.Context, keep int) ([]*Bundle, error) {
	if keep < 0 {
		return nil, fmt.Errorf("store: prune: keep %d: want 0 or more", keep)
	}
	all, err := s.List()
	if err != nil {
		return nil, err
	}
	var removed []*Bundle
	for i := keep; i < len(all); i++ {
		if err := s.Remove(ctx, all[i].Fingerprint); err != nil && !errors.Is(err, ErrNotFound) {
			return removed, err
		}
		removed = append(removed, all[i])
	}
	return removed, nil
}

// Ref records what a source reference resolved to, so a later conversion of the same reference
// can find its bundle without the network (see the pull policies of imaging/oci).
type Ref struct {
	Source   string    `json:"source"`
	Platform string    `json:"platform"`
	Digest   string    `json:"digest"` // what the reference pointed at (an index or a manifest)
	ID       string    `json:"id"`     // the image identity fingerprints derive from
	Time     time.Time `json:"time"`
}

// Ref returns the resolution recorded under key, if any.
func (s *Store) Ref(key string) (*Ref, bool) {
	if checkFP(key) != nil {
		return nil, false
	}
	data, err := os.ReadFile(filepath.Join(s.Dir, ".refs", key+".json"))
	if err != nil {
		return nil, false
	}
	var r Ref
	if err := json.Unmarshal(data, &r); err != nil || r.ID == "" {
		return nil, false
	}
	return &r, true
}

// SetRef records a resolution under key (atomically: readers see the old or the new one).
func (s *Store) SetRef(key string, r Ref) error {
	if err := checkFP(key); err != nil {
		return err
	}
	dir := filepath.Join(s.Dir, ".refs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	data, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	f, err := os.CreateTemp(dir, ".tmp-")
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("store: write ref: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("store: write ref: %w", err)
	}
	if err := os.Rename(f.Name(), filepath.Join(dir, key+".json")); err != nil {
		return fmt.Errorf("store: write ref: %w", err)
	}
	return nil
}
