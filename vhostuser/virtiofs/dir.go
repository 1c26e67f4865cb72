package virtiofs

import (
	"bytes"
	"encoding/binary"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// dirStream is an open directory: its getdents64 buffer and where the guest is in it. FUSE
// offsets are the host file system's d_off cookies, so a guest that seeks (telldir/seekdir,
// or a READDIR that resumes after a short reply) lands where the host put it.
type dirStream struct {
	mu        sync.Mutex
	buf       []byte // getdents64 output not yet handed to the guest: buf[next:end]
	next, end int
	pos       uint64 // the offset the next entry in buf (or the next getdents64) starts at
}

const direntBufSize = 32 << 10

func (fs *passthrough) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n, s := fs.get(in.NodeId)
	if !s.Ok() {
		return s
	}
	defer fs.put(n)
	if n.typ != unix.S_IFDIR {
		return fuse.ENOTDIR
	}
	if !fs.reserveFD() {
		return fuse.Status(syscall.EMFILE)
	}
	fd, err := fs.reopen(n, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		fs.fds.Add(-1)
		return errStatus(err)
	}
	return fs.addHandle(&fileHandle{fd: fd, dir: &dirStream{}}, out)
}

func (fs *passthrough) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, false)
}

func (fs *passthrough) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, true)
}

func (fs *passthrough) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	h := fs.getHandle(in.Fh)
	if h == nil {
		return fuse.EBADF
	}
	defer fs.putHandle(h)
	d := h.dir
	if d == nil {
		return fuse.ENOTDIR
	}
	var dir *inode
	if plus {
		var s fuse.Status
		if dir, s = fs.get(in.NodeId); !s.Ok() {
			return s
		}
		defer fs.put(dir)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if in.Offset != d.pos {
		if _, err := unix.Seek(h.fd, int64(in.Offset), unix.SEEK_SET); err != nil {
			return errStatus(err)
		}
		d.pos, d.next, d.end = in.Offset, 0, 0
	}
	added := false
	for {
		if d.next == d.end {
			if d.buf == nil {
				d.buf = make([]byte, direntBufSize)
			}
			k, err := unix.Getdents(h.fd, d.buf)
			if err != nil {
				if added {
					return fuse.OK // report the error on the next call
				}
				return errStatus(err)
			}
			if k <= 0 {
				return fuse.OK
			}
			d.next, d.end = 0, k
		}
		e, size, ok := parseDirent(d.buf[d.next:d.end])
		if !ok {
			d.next = d.end // a short record cannot come from the kernel; drop the rest
			continue
		}
		if plus {
			eo := out.AddDirLookupEntry(e)
			if eo == nil {
				return fuse.OK
			}
			if e.Name != "." && e.Name != ".." {
				// An entry that vanished since getdents keeps node ID 0: the guest lists
				// it without caching an inode.
				fs.lookupAt(dir, e.Name, eo)
			}
		} else if !out.AddDirEntry(e) {
			return fuse.OK
		}
		added = true
		d.next += size
		d.pos = e.Off
	}
}

// parseDirent decodes the linux_dirent64 at the start of b.
func parseDirent(b []byte) (fuse.DirEntry, int, bool) {
	const hdr = 19 // d_ino 8, d_off 8, d_reclen 2, d_type 1
	if len(b) < hdr {
		return fuse.DirEntry{}, 0, false
	}
	reclen := int(binary.NativeEndian.Uint16(b[16:]))
	if reclen < hdr || reclen > len(b) {
		return fuse.DirEntry{}, 0, false
	}
	name := b[hdr:reclen]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	return fuse.DirEntry{
		Ino:  binary.NativeEndian.Uint64(b[0:]),
		Off:  binary.NativeEndian.Uint64(b[8:]),
		Mode: uint32(b[18]) << 12,
		Name: string(name),
	}, reclen, true
}
