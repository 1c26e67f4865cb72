package ext4

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
)

// writeChunk is how much file data writeData reads and writes at a time: small enough to stay
// in the CPU cache between the read, the hash copy and the pwrite (1 MiB cost ~25% more kernel
// time on a 5 GiB input), large enough that syscalls are few.
const writeChunk = 128 << 10

const maxFileSize = (1<<32 - 1) * blockSize // extents address 2^32 logical blocks

// builder accumulates one image: file data is written as it arrives, metadata at finish.
type builder struct {
	ctx   context.Context
	opts  Options
	f     *os.File
	w     *combiner
	dry   bool // hash only (FingerprintDir): no file, nothing written
	a     *allocator
	t     *tree
	sum   hash.Hash // identity hash of the options and injected files
	in    *treeHash // content hash of the input (disabled when Options.UUID is given)
	data  []*node   // nodes that own data blocks
	buf   []byte
	zero  []byte
	bytes int64 // content bytes seen, for the automatic size
}

func newBuilder(ctx context.Context, f *os.File, opts Options) (*builder, error) {
	b := &builder{
		ctx:  ctx,
		opts: opts,
		f:    f,
		w:    newCombiner(f),
		t:    newTree(),
		sum:  newIdentity(opts),
		in:   newTreeHash(opts.UUID == ""),
		buf:  make([]byte, writeChunk),
		zero: make([]byte, blockSize),
		a:    &allocator{gdtRes: autoGDTBlocks},
		dry:  f == nil,
	}
	if opts.Size != 0 {
		blocks, groups, err := sizeGeometry(opts.Size)
		if err != nil {
			return nil, err
		}
		b.a.limit = blocks
		b.a.gdtRes = (groups*descSize + blockSize - 1) / blockSize
	}
	return b, nil
}

// newIdentity starts the hash the UUID derives from: format version and options first, then the
// injected files; identity adds the input's content hash (or the given UUID) last.
func newIdentity(opts Options) hash.Hash {
	h := sha256.New()
	fmt.Fprintf(h, "virtkit-ext4 format %d\n", FormatVersion)
	fmt.Fprintf(h, "size=%d free=%d journal=%t label=%q\n", opts.Size, opts.Free, !opts.NoJournal, opts.Label)
	return h
}

// sizeGeometry turns a requested size into whole blocks and groups, dropping a last group too
// small to be useful.
func sizeGeometry(size int64) (blocks, groups uint64, err error) {
	if size < 0 {
		return 0, 0, fmt.Errorf("negative size %d", size)
	}
	blocks = uint64(size) / blockSize
	groups = (blocks + blocksPerGroup - 1) / blocksPerGroup
	if groups > 1 {
		last := blocks - (groups-1)*blocksPerGroup
		gdt := (groups*descSize + blockSize - 1) / blockSize
		if last < 1+gdt+64 {
			groups--
			blocks = groups * blocksPerGroup
		}
	}
	if blocks < 64 {
		return 0, 0, fmt.Errorf("size %d: an image needs at least 256 KiB", size)
	}
	if groups > 1<<27 {
		return 0, 0, fmt.Errorf("size %d: larger than 16 EiB... or at least than we support", size)
	}
	return blocks, groups, nil
}

func isZero(p []byte, zero []byte) bool { return bytes.Equal(p, zero) }

// writeData streams size bytes of r into newly allocated blocks of n; all-zero blocks stay holes.
func (b *builder) writeData(n *node, r io.Reader, size int64) error {
	if size < 0 || uint64(size) > maxFileSize {
		return fmt.Errorf("file size %d out of range (ext4 with 4 KiB blocks holds up to 16 TiB)", size)
	}
	if b.a.limit != 0 && uint64(size) > b.a.limit*blockSize {
		return fmt.Errorf("file of %d bytes: %w (image is %d bytes)", size, ErrNoSpace, b.a.limit*blockSize)
	}
	n.size = uint64(size)
	b.bytes += size
	if b.dry {
		if _, err := copyCtx(b.ctx, io.Discard, io.LimitReader(r, size)); err != nil {
			return err
		}
		return nil
	}
	var lblk uint64
	for left := size; left > 0; {
		if err := b.ctx.Err(); err != nil {
			return err
		}
		want := min(int64(len(b.buf)), left)
		k, err := io.ReadFull(r, b.buf[:want])
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("read data: %w", err)
		}
		left -= int64(k)
		nb := (k + blockSize - 1) / blockSize
		clear(b.buf[k : nb*blockSize])
		for i := 0; i < nb; {
			if isZero(b.buf[i*blockSize:(i+1)*blockSize], b.zero) {
				i++
				continue
			}
			j := i + 1
			for j < nb && !isZero(b.buf[j*blockSize:(j+1)*blockSize], b.zero) {
				j++
			}
			if err := b.place(n, lblk+uint64(i), b.buf[i*blockSize:j*blockSize]); err != nil {
				return err
			}
			i = j
		}
		lblk += uint64(nb)
	}
	return nil
}

// put places n at p and remembers it if it owns data, so the data can be freed when a later
// entry replaces it.
func (b *builder) put(p string, n *node) error {
	n, err := b.t.put(p, n)
	if err != nil {
		return err
	}
	if len(n.ext) > 0 {
		b.data = append(b.data, n)
	}
	return nil
}

// place writes whole blocks of data at logical block lblk of n.
func (b *builder) place(n *node, lblk uint64, data []byte) error {
	for len(data) > 0 {
		start, got, err := b.a.take(uint64(len(data) / blockSize))
		if err != nil {
			return err
		}
		chunk := data[:got*blockSize]
		if _, err := b.w.WriteAt(chunk, int64(start)*blockSize); err != nil {
			return fmt.Errorf("write data: %w", err)
		}
		addExtent(n, lblk, start, got)
		lblk += got
		data = data[got*blockSize:]
	}
	return nil
}

// addExtent appends a mapping, merging with the previous one when contiguous.
func addExtent(n *node, lblk, pblk, count uint64) {
	for count > 0 {
		if k := len(n.ext); k > 0 {
			e := &n.ext[k-1]
			if uint64(e.lblk)+uint64(e.len) == lblk && e.pblk+uint64(e.len) == pblk && e.len < maxExtentLen {
				add := min(count, uint64(maxExtentLen-e.len))
				e.len += uint32(add)
				lblk, pblk, count = lblk+add, pblk+add, count-add
				continue
			}
		}
		add := min(count, maxExtentLen)
		n.ext = append(n.ext, extent{lblk: uint32(lblk), len: uint32(add), pblk: pblk})
		lblk, pblk, count = lblk+add, pblk+add, count-add
	}
}

// writeBlocks allocates room for data (whole blocks) and writes it, returning the extents in
// logical order from lblk 0.
func (b *builder) writeBlocks(n *node, data []byte) error {
	n.ext = n.ext[:0]
	return b.place(n, 0, data)
}
