package oci

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
)

// Transport names where an image comes from, in the containers-transports spelling.
type Transport string

const (
	Docker        Transport = "docker"         // a registry: docker://REF or a bare REF
	OCILayout     Transport = "oci"            // an OCI image layout folder: oci:PATH[:TAG]
	DockerArchive Transport = "docker-archive" // a `docker save` tarball: docker-archive:PATH[:REF]
	Tarball       Transport = "tar"            // a root filesystem tar (`docker export`): tar:PATH
)

// Source is a parsed image reference.
type Source struct {
	Transport Transport
	// Ref is the registry reference (Docker), normalised ("index.docker.io/library/debian:latest").
	Ref string
	// Path is the layout folder or the archive file (other transports), absolute.
	Path string
	// Tag picks an image inside a layout (its org.opencontainers.image.ref.name) or an archive.
	Tag string
}

// ParseSource parses "docker://REF", "oci:PATH[:TAG]", "docker-archive:PATH[:REF]", "tar:PATH" or
// a bare registry reference. insecure allows plain-HTTP registries. As in containers-transports,
// a layout PATH cannot contain ':'; use docker:// to force a registry whose host looks like a
// transport name.
func ParseSource(s string, insecure bool) (Source, error) {
	src, err := parseSource(s, insecure)
	if err != nil {
		return Source{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return src, nil
}

// ErrInvalid is wrapped by errors for references, manifests and configs that cannot be used
// whatever the retry: a malformed reference, a config that disagrees with its manifest, no image
// for the platform, an unsupported media type.
var ErrInvalid = errors.New("invalid image")

func parseSource(s string, insecure bool) (Source, error) {
	if s == "" {
		return Source{}, errors.New("image reference is empty")
	}
	if strings.ContainsAny(s, "\x00\n") {
		return Source{}, fmt.Errorf("image reference %q: contains a control character", s)
	}
	if rest, ok := strings.CutPrefix(s, "docker://"); ok {
		return parseRegistry(rest, insecure)
	}
	tr, rest, ok := strings.Cut(s, ":")
	if ok && !strings.Contains(tr, "/") && !strings.Contains(tr, ".") {
		switch Transport(tr) {
		case OCILayout, DockerArchive:
			// The path ends at the first ':'; a docker-archive REF may itself contain one (repo:tag).
			path, tag, _ := strings.Cut(rest, ":")
			return localSource(Transport(tr), path, tag)
		case Tarball:
			return localSource(Tarball, rest, "")
		case "docker":
			return Source{}, fmt.Errorf("image reference %q: write docker://REF", s)
		case "containers-storage", "dir", "oci-archive", "docker-daemon", "sif":
			return Source{}, fmt.Errorf("image reference %q: transport %q is not supported (use docker://, oci:, docker-archive: or tar:)", s, tr)
		}
	}
	if strings.Contains(s, "://") {
		return Source{}, fmt.Errorf("image reference %q: unknown scheme (use docker://, oci:, docker-archive: or tar:)", s)
	}
	return parseRegistry(s, insecure)
}

func parseRegistry(ref string, insecure bool) (Source, error) {
	var opts []name.Option
	if insecure {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(ref, opts...)
	if err != nil {
		return Source{}, fmt.Errorf("image reference %q: %w", ref, err)
	}
	return Source{Transport: Docker, Ref: r.Name()}, nil
}

func localSource(t Transport, path, tag string) (Source, error) {
	if path == "" {
		return Source{}, fmt.Errorf("image reference %s:: the path is empty", t)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return Source{}, fmt.Errorf("image reference %s:%s: %w", t, path, err)
	}
	return Source{Transport: t, Path: abs, Tag: tag}, nil
}

// String is the canonical form of the source.
func (s Source) String() string {
	switch s.Transport {
	case Docker:
		return "docker://" + s.Ref
	case Tarball:
		return "tar:" + s.Path
	}
	if s.Tag != "" {
		return string(s.Transport) + ":" + s.Path + ":" + s.Tag
	}
	return string(s.Transport) + ":" + s.Path
}

// reference parses a Docker source's Ref again (it was validated by ParseSource).
func (s Source) reference(insecure bool) (name.Reference, error) {
	var opts []name.Option
	if insecure {
		opts = append(opts, name.Insecure)
	}
	return name.ParseReference(s.Ref, opts...)
}
