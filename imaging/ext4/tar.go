package ext4

import (
	"archive/tar"
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// decompress returns the tar stream inside r, which may be plain, gzip or zstd.
func decompress(br *bufio.Reader) (io.Reader, func(), error) {
	magic, _ := br.Peek(6)
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		z, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("gzip: %w", err)
		}
		z.Multistream(true)
		return z, func() { z.Close() }, nil
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		z, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30))
		if err != nil {
			return nil, nil, fmt.Errorf("zstd: %w", err)
		}
		return z, z.Close, nil
	case bytes.HasPrefix(magic, []byte{0xfd, '7', 'z', 'X', 'Z', 0}):
		return nil, nil, errors.New("xz-compressed input is not supported; use gzip, zstd or plain tar")
	case bytes.HasPrefix(magic, []byte("BZh")):
		return nil, nil, errors.New("bzip2-compressed input is not supported; use gzip, zstd or plain tar")
	}
	return br, func() {}, nil
}

// readTar adds every entry of a (possibly compressed) tar stream. All input bytes, including
// any after the end-of-archive marker, go into the content hash.
func (b *builder) readTar(r io.Reader) error {
	// Every byte read passes to the content hash as it is read: the copy into a leaf is cheap
	// while the bytes are still in this core's cache, the leaves are hashed on the others. (A
	// read-ahead goroutine cost more: ~0.5 s of copies between cores on a 5 GiB input.) Large
	// reads bypass br and land in writeData's buffer directly.
	var src io.Reader = r
	if !b.in.off {
		src = io.TeeReader(r, b.in)
	}
	br := bufio.NewReaderSize(src, blockSize)
	tr, done, err := decompress(br)
	if err != nil {
		return err
	}
	defer done()
	z := &zeroTail{r: tr}
	t := tar.NewReader(z)
	for {
		if err := b.ctx.Err(); err != nil {
			return err
		}
		hdr, err := t.Next()
		if err == io.EOF {
			// archive/tar also reports a clean end when the stream stops between entries;
			// only the end-of-archive marker (or an empty input) says nothing was lost.
			if z.n > 0 && z.zeros < 1024 {
				return fmt.Errorf("read tar: %w (no end-of-archive marker)", io.ErrUnexpectedEOF)
			}
			break
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("read tar: %w", err)
		}
		if err := b.tarEntry(t, hdr); err != nil {
			return fmt.Errorf("tar entry %q: %w", hdr.Name, err)
		}
	}
	if _, err := io.Copy(io.Discard, tr); err != nil {
		return fmt.Errorf("read tar trailer: %w", err)
	}
	if _, err := io.Copy(io.Discard, br); err != nil {
		return fmt.Errorf("read input: %w", err)
	}
	return nil
}

// tarEntry adds one entry; t reads a regular file's data.
func (b *builder) tarEntry(t io.Reader, h *tar.Header) error {
	p, err := cleanPath(h.Name)
	if err != nil {
		return err
	}
	if h.Uid < 0 || h.Gid < 0 || h.Uid > 1<<32-1 || h.Gid > 1<<32-1 {
		return fmt.Errorf("owner %d:%d out of range", h.Uid, h.Gid)
	}
	n := &node{
		mode:  uint16(h.Mode & 0o7777),
		uid:   uint32(h.Uid),
		gid:   uint32(h.Gid),
		mtime: toTimespec(h.ModTime),
	}
	n.atime, n.ctime = n.mtime, n.mtime
	if !h.AccessTime.IsZero() {
		n.atime = toTimespec(h.AccessTime)
	}
	if !h.ChangeTime.IsZero() {
		n.ctime = toTimespec(h.ChangeTime)
	}
	if n.xattrs, err = tarXattrs(h); err != nil {
		return err
	}
	switch h.Typeflag {
	case tar.TypeReg, '\x00', tar.TypeCont, tar.TypeGNUSparse: // '\x00': pre-POSIX regular file
		n.mode |= sIFREG
		if err := b.writeData(n, t, h.Size); err != nil {
			return err
		}
	case tar.TypeDir:
		n.mode |= sIFDIR
		n.kids = map[string]*node{}
	case tar.TypeSymlink:
		n.mode |= sIFLNK
		if h.Linkname == "" || len(h.Linkname) >= blockSize || strings.IndexByte(h.Linkname, 0) >= 0 {
			return fmt.Errorf("bad symlink target of %d bytes", len(h.Linkname))
		}
		n.target = h.Linkname
		n.mode |= 0o777 // Linux symlinks carry no permissions of their own
	case tar.TypeLink:
		target, err := cleanPath(h.Linkname)
		if err != nil {
			return err
		}
		if target == p {
			return nil
		}
		return b.t.link(p, target)
	case tar.TypeChar, tar.TypeBlock:
		n.mode |= sIFCHR
		if h.Typeflag == tar.TypeBlock {
			n.mode = n.mode&^sIFMT | sIFBLK
		}
		if h.Devmajor < 0 || h.Devminor < 0 || h.Devmajor >= 1<<12 || h.Devminor >= 1<<20 {
			return fmt.Errorf("device %d:%d out of range", h.Devmajor, h.Devminor)
		}
		n.major, n.minor = uint32(h.Devmajor), uint32(h.Devminor)
	case tar.TypeFifo:
		n.mode |= sIFIFO
	case 'V': // GNU volume label
		return nil
	default:
		return fmt.Errorf("unsupported entry type %q", h.Typeflag)
	}
	return b.put(p, n)
}

// tarXattrs collects SCHILY.xattr.* (GNU tar, Docker) and LIBARCHIVE.xattr.* records.
func tarXattrs(h *tar.Header) ([]xattr, error) {
	var out []xattr
	keys := make([]string, 0, len(h.PAXRecords))
	for k := range h.PAXRecords {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := h.PAXRecords[k]
		var name string
		var value []byte
		switch {
		case strings.HasPrefix(k, "SCHILY.xattr."):
			name, value = k[len("SCHILY.xattr."):], []byte(v)
		case strings.HasPrefix(k, "LIBARCHIVE.xattr."):
			n, err := url.QueryUnescape(k[len("LIBARCHIVE.xattr."):])
			if err != nil {
				return nil, fmt.Errorf("xattr record %q: %w", k, err)
			}
			d, err := base64.StdEncoding.DecodeString(v)
			if err != nil {
				if d, err = base64.RawStdEncoding.DecodeString(v); err != nil {
					return nil, fmt.Errorf("xattr record %q: %w", k, err)
				}
			}
			name, value = n, d
		default:
			continue
		}
		x, ok, err := newXattr(name, value)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, x)
		}
	}
	return sortXattrs(out), nil
}

// zeroTail counts the bytes read and how many of the last ones were zero.
type zeroTail struct {
	r     io.Reader
	n     int64
	zeros int64
}

func (z *zeroTail) Read(p []byte) (int, error) {
	k, err := z.r.Read(p)
	z.n += int64(k)
	for i := k - 1; i >= 0; i-- {
		if p[i] != 0 {
			z.zeros = int64(k - 1 - i)
			return k, err
		}
	}
	z.zeros += int64(k)
	return k, err
}
