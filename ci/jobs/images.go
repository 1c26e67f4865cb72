package jobs

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/imaging/store"
)

// Images turns a job's image reference into a bootable bundle.
type Images interface {
	Resolve(ctx context.Context, ref string) (*store.Bundle, error)
}

// AllowList decides which image references jobs may use. Entries are registry hosts with an
// optional path prefix ("registry.gitlab.com", "docker.io/library", "ghcr.io/acme/") or local
// transports with an optional path prefix ("tar:", "oci:/srv/images/", "docker-archive:/srv/").
// Docker Hub may be written docker.io or index.docker.io. An empty list allows nothing.
type AllowList []string

// Check returns nil when ref may be used, else an error that names the rule it broke.
func (a AllowList) Check(ref string) error {
	src, err := oci.ParseSource(ref, false)
	if err != nil {
		return err
	}
	for _, e := range a {
		if allows(e, src) {
			return nil
		}
	}
	return fmt.Errorf("image %q is not allowed on this host (ci.allowed_registries: %s)", ref, strings.Join(a, ", "))
}

func allows(entry string, src oci.Source) bool {
	for _, t := range []oci.Transport{oci.Tarball, oci.OCILayout, oci.DockerArchive} {
		if prefix, ok := strings.CutPrefix(entry, string(t)+":"); ok {
			if src.Transport != t {
				return false
			}
			if prefix == "" {
				return true
			}
			p := filepath.Clean(prefix)
			return src.Path == p || strings.HasPrefix(src.Path, strings.TrimSuffix(p, "/")+"/")
		}
	}
	if src.Transport != oci.Docker {
		return false
	}
	ref := src.Ref // normalised: index.docker.io/library/debian:12
	host, path, _ := strings.Cut(ref, "/")
	eHost, ePath, _ := strings.Cut(strings.TrimSuffix(entry, "/"), "/")
	if eHost == "docker.io" {
		eHost = "index.docker.io"
	}
	if !strings.EqualFold(host, eHost) {
		return false
	}
	if ePath == "" {
		return true
	}
	return path == ePath || strings.HasPrefix(path, ePath+"/") || strings.HasPrefix(path, ePath+":") || strings.HasPrefix(path, ePath+"@")
}

// Converter resolves images with oci.Convert into a bundle store, after the allow-list. One
// conversion per reference runs at a time; the store's cache makes repeats cheap.
type Converter struct {
	Allowed AllowList
	Options oci.Options
	// Store is the bundle store folder; Agent the virtkit-agent binary to inject.
	Store, Agent string
	Log          zerolog.Logger

	mu    sync.Mutex
	locks map[string]*sync.Mutex
}

// Resolve implements Images. A disallowed or malformed reference is a job failure (ErrJob).
func (c *Converter) Resolve(ctx context.Context, ref string) (*store.Bundle, error) {
	if err := c.Allowed.Check(ref); err != nil {
		return nil, &Failure{Msg: err.Error()}
	}
	c.mu.Lock()
	if c.locks == nil {
		c.locks = map[string]*sync.Mutex{}
	}
	l := c.locks[ref]
	if l == nil {
		l = &sync.Mutex{}
		c.locks[ref] = l
	}
	c.mu.Unlock()
	l.Lock()
	defer l.Unlock()
	b, built, err := oci.ConvertStatus(ctx, ref, oci.ConvertOptions{Options: c.Options, Store: c.Store, Agent: c.Agent, NoJournal: true})
	if errors.Is(err, oci.ErrInvalid) {
		return nil, &Failure{Msg: fmt.Sprintf("image %s: %v", ref, err)}
	}
	if err != nil {
		return nil, fmt.Errorf("jobs: image %s: %w", ref, err)
	}
	c.Log.Debug().Str("image", ref).Bool("built", built).Msg("image ready")
	return b, nil
}
