package ext4

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// Inject adds a host file to the image (e.g. the agent as /sbin/virtkit-agent), owned by root,
// after the input, so it replaces an entry of the same name. Missing parent directories are
// created (0755).
type Inject struct {
	Src, Dst string
	Mode     fs.FileMode
	Data     []byte // the content, when Src is empty (e.g. a generated /.virtkit/image.json)
}

// open returns the injected content and its size.
func (in Inject) open() (io.ReadCloser, int64, error) {
	if in.Src == "" {
		return io.NopCloser(bytes.NewReader(in.Data)), int64(len(in.Data)), nil
	}
	f, err := os.Open(in.Src)
	if err != nil {
		return nil, 0, fmt.Errorf("inject: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("inject: %w", err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, 0, fmt.Errorf("inject %s: not a regular file", in.Src)
	}
	return f, st.Size(), nil
}

// Options shape the image. The zero value builds an automatically sized, journaled image with a
// content-derived UUID.
type Options struct {
	Size      int64 // bytes; 0 = automatic (content + Free headroom)
	Free      int64 // headroom bytes for automatic size; 0 = 10% of the content, at least 64 MiB
	NoJournal bool  // no JBD2 journal (throwaway images)
	Label     string
	UUID      string // override; "" = content-derived
	Inject    []Inject
	// Sync flushes the image to stable storage before renaming it into place, so a crash never
	// leaves a complete-looking image with missing blocks (use it for caches keyed by UUID).
	Sync bool
}

// Result describes a written image.
type Result struct {
	UUID string
	Size int64 // image bytes (the file is sparse)
}

func (o Options) check() error {
	if len(o.Label) > 16 {
		return fmt.Errorf("label %q longer than 16 bytes", o.Label)
	}
	if o.Size < 0 || o.Free < 0 {
		return errors.New("negative size or free space")
	}
	if o.UUID != "" {
		if _, err := parseUUID(o.UUID); err != nil {
			return err
		}
	}
	for _, in := range o.Inject {
		if in.Dst == "" || (in.Src == "" && in.Data == nil) {
			return fmt.Errorf("inject %q:%q: a source (or data) and a destination are required", in.Src, in.Dst)
		}
	}
	return nil
}

// WriteTar builds out from a tar stream (plain, gzip or zstd, detected by magic).
func WriteTar(ctx context.Context, r io.Reader, out string, opts Options) (Result, error) {
	return write(ctx, out, opts, func(b *builder) error {
		return b.readTar(r)
	})
}

// WriteDir builds out from the tree at dir (which is not modified). Access times are taken from
// the modification times: reading the tree would otherwise change the image.
func WriteDir(ctx context.Context, dir, out string, opts Options) (Result, error) {
	return write(ctx, out, opts, func(b *builder) error {
		return b.readDir(dir)
	})
}

// WriteEmpty builds an empty filesystem (only / and /lost+found, plus injected files): per-VM
// writable disks and data volumes.
func WriteEmpty(ctx context.Context, out string, opts Options) (Result, error) {
	return write(ctx, out, opts, func(b *builder) error { return nil })
}

// Fingerprint returns the UUID WriteTar would give r with opts, without writing anything. With
// opts.UUID set that is the answer, and r is not read.
func Fingerprint(ctx context.Context, r io.Reader, opts Options) (string, error) {
	if err := opts.check(); err != nil {
		return "", fmt.Errorf("mkext: %w", err)
	}
	if opts.UUID != "" {
		u, _ := parseUUID(opts.UUID)
		return formatUUID(u), nil
	}
	b := &builder{ctx: ctx, opts: opts, sum: newIdentity(opts), in: newTreeHash(true)}
	if _, err := copyCtx(ctx, b.in, r); err != nil {
		return "", fmt.Errorf("mkext: fingerprint: read input: %w", err)
	}
	for _, in := range opts.Inject {
		if err := hashInject(b, in); err != nil {
			return "", fmt.Errorf("mkext: fingerprint: %w", err)
		}
	}
	u, _, err := b.identity()
	if err != nil {
		return "", fmt.Errorf("mkext: %w", err)
	}
	return formatUUID(u), nil
}

// FingerprintDir returns the UUID WriteDir would give dir with opts, reading the tree but
// writing nothing.
func FingerprintDir(ctx context.Context, dir string, opts Options) (string, error) {
	if err := opts.check(); err != nil {
		return "", fmt.Errorf("mkext: %w", err)
	}
	if opts.UUID != "" {
		u, _ := parseUUID(opts.UUID)
		return formatUUID(u), nil
	}
	b, err := newBuilder(ctx, nil, opts)
	if err != nil {
		return "", fmt.Errorf("mkext: %w", err)
	}
	if err := b.readDir(dir); err != nil {
		return "", fmt.Errorf("mkext: fingerprint: %w", err)
	}
	for _, in := range opts.Inject {
		if err := hashInject(b, in); err != nil {
			return "", fmt.Errorf("mkext: fingerprint: %w", err)
		}
	}
	u, _, err := b.identity()
	if err != nil {
		return "", fmt.Errorf("mkext: %w", err)
	}
	return formatUUID(u), nil
}

// Writer builds an image entry by entry, for producers that hold parsed entries already (the
// OCI flattener): each Add has the semantics of one entry of WriteTar's stream, without a tar
// stream encoded and parsed again in between. With no input stream to derive an identity from,
// it needs Options.UUID. Like WriteTar it writes a temporary file next to out and renames it
// into place on Close; Abort (or a failed Close) leaves nothing. A Writer is used by one
// goroutine at a time.
type Writer struct {
	b    *builder
	f    *os.File
	out  string
	done bool
}

// Create starts an image at out. opts.UUID must be set.
func Create(ctx context.Context, out string, opts Options) (*Writer, error) {
	if opts.UUID == "" {
		return nil, errors.New("mkext: Create needs Options.UUID (an image built entry by entry has no content to name it)")
	}
	return create(ctx, out, opts)
}

func create(ctx context.Context, out string, opts Options) (*Writer, error) {
	if err := opts.check(); err != nil {
		return nil, fmt.Errorf("mkext: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("mkext: create output: %w", err)
	}
	b, err := newBuilder(ctx, f, opts)
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("mkext: %w", err)
	}
	return &Writer{b: b, f: f, out: out}, nil
}

// Add adds one entry as a tar extractor would: a later entry replaces an earlier one of the same
// name, missing parents are made. For a regular file data holds its h.Size bytes.
func (w *Writer) Add(h *tar.Header, data io.Reader) error {
	if w.done {
		return errors.New("mkext: Add after Close or Abort")
	}
	if err := w.b.ctx.Err(); err != nil {
		return fmt.Errorf("mkext: %w", err)
	}
	if err := w.b.tarEntry(data, h); err != nil {
		return fmt.Errorf("mkext: entry %q: %w", h.Name, err)
	}
	return nil
}

// Abort removes the unfinished image; it does nothing after Close.
func (w *Writer) Abort() {
	if w.done {
		return
	}
	w.done = true
	w.f.Close()
	os.Remove(w.f.Name())
}

// Close adds the injected files, writes the metadata and renames the image into place.
func (w *Writer) Close() (res Result, err error) {
	if w.done {
		return Result{}, errors.New("mkext: Close after Close or Abort")
	}
	defer func() {
		if err != nil {
			w.Abort()
		}
	}()
	b, f, opts := w.b, w.f, w.b.opts
	for _, in := range opts.Inject {
		if err := b.inject(in); err != nil {
			return Result{}, fmt.Errorf("mkext: %w", err)
		}
	}
	if res, err = b.finish(); err != nil {
		return Result{}, fmt.Errorf("mkext: %w", err)
	}
	if err := f.Chmod(0o644); err != nil {
		return Result{}, fmt.Errorf("mkext: %w", err)
	}
	if opts.Sync {
		if err := f.Sync(); err != nil {
			return Result{}, fmt.Errorf("mkext: sync output: %w", err)
		}
	}
	if err := f.Close(); err != nil {
		return Result{}, fmt.Errorf("mkext: close output: %w", err)
	}
	if err := os.Rename(f.Name(), w.out); err != nil {
		return Result{}, fmt.Errorf("mkext: %w", err)
	}
	w.done = true
	if opts.Sync {
		if d, err := os.Open(filepath.Dir(w.out)); err == nil {
			d.Sync()
			d.Close()
		}
	}
	return res, nil
}

// write runs fill into a temporary file next to out and renames it into place on success.
func write(ctx context.Context, out string, opts Options, fill func(*builder) error) (Result, error) {
	w, err := create(ctx, out, opts)
	if err != nil {
		return Result{}, err
	}
	if err := fill(w.b); err != nil {
		w.Abort()
		return Result{}, fmt.Errorf("mkext: %w", err)
	}
	return w.Close()
}

// inject adds one host file.
func (b *builder) inject(in Inject) error {
	p, err := cleanPath(in.Dst)
	if err != nil || p == "" {
		return fmt.Errorf("inject %s: bad destination %q", in.Src, in.Dst)
	}
	r, size, err := in.open()
	if err != nil {
		return err
	}
	defer r.Close()
	fmt.Fprintf(b.sum, "inject %q %o %d\n", p, modeBits(in.Mode), size)
	n := &node{mode: sIFREG | modeBits(in.Mode)}
	if err := b.writeData(n, io.TeeReader(r, b.sum), size); err != nil {
		return fmt.Errorf("inject %s: %w", in.Dst, err)
	}
	return b.put(p, n)
}

// hashInject mirrors inject's contribution to the identity hash.
func hashInject(b *builder, in Inject) error {
	p, err := cleanPath(in.Dst)
	if err != nil || p == "" {
		return fmt.Errorf("inject %s: bad destination %q", in.Src, in.Dst)
	}
	r, size, err := in.open()
	if err != nil {
		return err
	}
	defer r.Close()
	fmt.Fprintf(b.sum, "inject %q %o %d\n", p, modeBits(in.Mode), size)
	_, err = copyCtx(b.ctx, b.sum, io.LimitReader(r, size))
	return err
}

// modeBits maps an fs.FileMode's permission and special bits to i_mode bits.
func modeBits(m fs.FileMode) uint16 {
	v := uint16(m.Perm())
	if m&fs.ModeSetuid != 0 {
		v |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		v |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		v |= 0o1000
	}
	return v
}

func copyCtx(ctx context.Context, w io.Writer, r io.Reader) (int64, error) {
	var n int64
	buf := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			return n, err
		}
		k, err := r.Read(buf)
		w.Write(buf[:k])
		n += int64(k)
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// toTimespec clamps t to what ext4's 34-bit seconds can hold.
func toTimespec(t time.Time) timespec {
	if t.IsZero() {
		return timespec{}
	}
	s := t.Unix()
	const lo, hi = -(1 << 31), 1<<34 - 1<<31 - 1
	if s < lo {
		return timespec{sec: lo}
	}
	if s > hi {
		return timespec{sec: hi, nsec: 999999999}
	}
	return timespec{sec: s, nsec: uint32(t.Nanosecond())}
}
