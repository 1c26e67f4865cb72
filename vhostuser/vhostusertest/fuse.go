package vhostusertest

import (
	"encoding/binary"
	"fmt"
	"sync"
	"syscall"
	"time"
)

// FUSE opcodes used by the harness.
const (
	OpLookup     = 1
	OpForget     = 2
	OpGetattr    = 3
	OpReadlink   = 5
	OpSymlink    = 6
	OpMknod      = 8
	OpMkdir      = 9
	OpUnlink     = 10
	OpRmdir      = 11
	OpRename     = 12
	OpLink       = 13
	OpOpen       = 14
	OpRead       = 15
	OpWrite      = 16
	OpStatfs     = 17
	OpRelease    = 18
	OpInit       = 26
	OpOpendir    = 27
	OpReaddir    = 28
	OpReleasedir = 29
	OpCreate     = 35

	inHeaderSize  = 40
	outHeaderSize = 16
	// EntryOutSize is fuse_entry_out (with the 88-byte fuse_attr).
	EntryOutSize = 128
	attrOutSize  = 104
)

// FUSE is a FUSE client speaking to a virtio-fs backend through the harness's request queue,
// one request at a time per slot.
type FUSE struct {
	f      *Frontend
	q      *VQ
	mu     sync.Mutex
	unique uint64
	in     uint64 // guest buffer for the request
	out    uint64 // guest buffer for the reply
	bufLen uint64
	// MaxWrite is what the daemon announced in INIT.
	MaxWrite uint32
	// Pages makes every later request look like one from Linux's virtio-fs driver: the
	// header and each argument in a descriptor of its own, file data (a WRITE's payload, a
	// READ's reply) in 4 KiB descriptors that are not adjacent in guest memory (page cache
	// pages seldom are), all of it in one indirect table. Without it a request is two
	// descriptors, one readable and one writable, which a backend can answer with one system
	// call on one buffer: faster than what a guest sends.
	Pages bool
	pages uint64 // guest memory for page-laid-out data: every other page of 2*maxPaged bytes
	table uint64 // the indirect table page-laid-out requests reuse
}

const (
	pageSize = 4096
	// maxPaged is the largest payload the page layout takes (a guest's max_pages is 256).
	maxPaged = 1 << 20
	// maxTable is the most descriptors of a page-laid-out request: header, arguments, pages.
	maxTable = 8 + 2*(maxPaged/pageSize)
)

// Attr is the part of fuse_attr tests look at.
type Attr struct {
	Ino, Size   uint64
	Mode, Nlink uint32
}

// Entry is a LOOKUP/CREATE/MKDIR result.
type Entry struct {
	NodeID uint64
	Attr   Attr
}

// NewFUSE sets the frontend up as a virtio-fs device (hiprio + one request queue), and sends
// FUSE_INIT.
func NewFUSE(f *Frontend, qsize uint16) (*FUSE, error) {
	if err := f.Setup(FeatureIndirect|FeatureEventIdx, 2, qsize); err != nil {
		return nil, err
	}
	c := &FUSE{f: f, q: f.Queues[1], bufLen: 2<<20 + 4096}
	c.in = f.Alloc(c.bufLen, 4096)
	c.out = f.Alloc(c.bufLen, 4096)
	c.pages = f.Alloc(2*maxPaged, pageSize)
	c.table = f.Alloc(16*maxTable, 16)
	in := make([]byte, 64)
	binary.LittleEndian.PutUint32(in, 7)
	binary.LittleEndian.PutUint32(in[4:], 31)
	binary.LittleEndian.PutUint32(in[8:], 1<<20)
	// ASYNC_READ | BIG_WRITES | MAX_PAGES
	binary.LittleEndian.PutUint32(in[12:], 1|1<<5|1<<22)
	out, err := c.Do(OpInit, 0, in[:16], 80)
	if err != nil {
		return nil, fmt.Errorf("FUSE_INIT: %w", err)
	}
	if len(out) >= 24 {
		c.MaxWrite = binary.LittleEndian.Uint32(out[20:])
	}
	return c, nil
}

// Errno is a FUSE error reply.
type Errno syscall.Errno

func (e Errno) Error() string { return fmt.Sprintf("fuse: %v", syscall.Errno(e)) }

// Do sends one request (header built here; body is everything after it) and returns the reply
// payload. An error reply comes back as Errno.
func (c *FUSE) Do(op uint32, nodeid uint64, body []byte, outLen int) ([]byte, error) {
	return c.DoParts(op, nodeid, [][]byte{body}, outLen)
}

// DoParts is Do with the body in pieces (e.g. WRITE's header and data).
func (c *FUSE) DoParts(op uint32, nodeid uint64, parts [][]byte, outLen int) ([]byte, error) {
	return c.DoInto(nil, op, nodeid, parts, outLen)
}

// DoInto is DoParts returning the reply payload appended to dst[:0], so that a caller reusing
// dst allocates nothing per request.
func (c *FUSE) DoInto(dst []byte, op uint32, nodeid uint64, parts [][]byte, outLen int) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.unique++
	n := inHeaderSize
	for _, p := range parts {
		n += len(p)
	}
	if uint64(n) > c.bufLen || uint64(outLen+outHeaderSize) > c.bufLen {
		return nil, fmt.Errorf("fuse: request of %d bytes too large for the harness", n)
	}
	m := c.f.Mem
	h := m[c.in : c.in+inHeaderSize]
	binary.LittleEndian.PutUint32(h, uint32(n))
	binary.LittleEndian.PutUint32(h[4:], op)
	binary.LittleEndian.PutUint64(h[8:], c.unique)
	binary.LittleEndian.PutUint64(h[16:], nodeid)
	clear(h[24:])
	var bufs, reply []Buf
	if c.Pages {
		var err error
		if bufs, reply, err = c.pageLayout(parts, outLen, op != OpForget); err != nil {
			return nil, err
		}
		if _, ok := c.q.AddIndirect(c.table, bufs); !ok {
			return nil, fmt.Errorf("fuse: request queue full")
		}
	} else {
		off := c.in + inHeaderSize
		for _, p := range parts {
			copy(m[off:], p)
			off += uint64(len(p))
		}
		bufs = []Buf{{Addr: c.in, Len: uint32(n)}}
		if op != OpForget {
			bufs = append(bufs, Buf{Addr: c.out, Len: uint32(outHeaderSize + outLen), Write: true})
			reply = []Buf{{Addr: c.out + outHeaderSize, Len: uint32(outLen)}}
		}
		if _, ok := c.q.Add(bufs); !ok {
			return nil, fmt.Errorf("fuse: request queue full")
		}
	}
	if err := c.q.Kick(); err != nil {
		return nil, err
	}
	used, err := c.q.Wait(30 * time.Second)
	if err != nil {
		return nil, err
	}
	u := used[0]
	if op == OpForget {
		return nil, nil
	}
	if u.Len < outHeaderSize {
		return nil, fmt.Errorf("fuse: reply of %d bytes", u.Len)
	}
	oh := m[c.out:]
	rlen := binary.LittleEndian.Uint32(oh)
	errno := int32(binary.LittleEndian.Uint32(oh[4:]))
	if got := binary.LittleEndian.Uint64(oh[8:]); got != c.unique {
		return nil, fmt.Errorf("fuse: reply for unique %d, want %d", got, c.unique)
	}
	if errno != 0 {
		return nil, Errno(-errno)
	}
	if rlen > u.Len || rlen < outHeaderSize {
		return nil, fmt.Errorf("fuse: reply header says %d bytes, used %d", rlen, u.Len)
	}
	dst = dst[:0]
	left := int(rlen) - outHeaderSize
	for _, b := range reply {
		k := min(left, int(b.Len))
		dst = append(dst, m[b.Addr:b.Addr+uint64(k)]...)
		if left -= k; left == 0 {
			break
		}
	}
	if dst == nil {
		dst = []byte{}
	}
	return dst, nil
}

// pageLayout writes a request's arguments to guest memory as Linux's virtio-fs driver lays
// them out (see Pages) and returns the request's descriptors and the reply payload's. The
// header is at c.in, the arguments but the last at c.in+4096; a last argument of more than a
// page is file data and goes to every other page of c.pages, as does a reply payload of more
// than a page (READ's); smaller ones are one descriptor.
func (c *FUSE) pageLayout(parts [][]byte, outLen int, wantReply bool) (bufs, reply []Buf, err error) {
	m := c.f.Mem
	bufs = append(bufs, Buf{Addr: c.in, Len: inHeaderSize})
	args := c.in + pageSize
	// data places n bytes (from src, unless nil) in page descriptors.
	data := func(src []byte, n int, write bool) []Buf {
		var out []Buf
		for i := 0; n > 0; i++ {
			k := min(n, pageSize)
			a := c.pages + uint64(2*i)*pageSize
			if src != nil {
				copy(m[a:a+uint64(k)], src[i*pageSize:])
			}
			out = append(out, Buf{Addr: a, Len: uint32(k), Write: write})
			n -= k
		}
		return out
	}
	for i, p := range parts {
		if len(p) == 0 {
			continue
		}
		if i == len(parts)-1 && len(p) > pageSize {
			if len(p) > maxPaged {
				return nil, nil, fmt.Errorf("fuse: %d bytes of data: more than the page layout's %d", len(p), maxPaged)
			}
			bufs = append(bufs, data(p, len(p), false)...)
			continue
		}
		copy(m[args:], p)
		bufs = append(bufs, Buf{Addr: args, Len: uint32(len(p))})
		args += uint64(len(p))
	}
	if !wantReply {
		return bufs, nil, nil
	}
	bufs = append(bufs, Buf{Addr: c.out, Len: outHeaderSize, Write: true})
	switch {
	case outLen > maxPaged:
		return nil, nil, fmt.Errorf("fuse: reply of %d bytes: more than the page layout's %d", outLen, maxPaged)
	case outLen > pageSize:
		reply = data(nil, outLen, true)
	case outLen > 0:
		reply = []Buf{{Addr: c.out + pageSize, Len: uint32(outLen), Write: true}}
	}
	return append(bufs, reply...), reply, nil
}

func cstr(s string) []byte { return append([]byte(s), 0) }

func parseEntry(b []byte) (Entry, error) {
	if len(b) < EntryOutSize {
		return Entry{}, fmt.Errorf("fuse: entry of %d bytes", len(b))
	}
	return Entry{NodeID: binary.LittleEndian.Uint64(b), Attr: parseAttr(b[40:])}, nil
}

func parseAttr(a []byte) Attr {
	return Attr{
		Ino: binary.LittleEndian.Uint64(a), Size: binary.LittleEndian.Uint64(a[8:]),
		Mode: binary.LittleEndian.Uint32(a[60:]), Nlink: binary.LittleEndian.Uint32(a[64:]),
	}
}

// Lookup resolves name in dir.
func (c *FUSE) Lookup(dir uint64, name string) (Entry, error) {
	b, err := c.Do(OpLookup, dir, cstr(name), EntryOutSize)
	if err != nil {
		return Entry{}, err
	}
	e, err := parseEntry(b)
	if err == nil && e.NodeID == 0 { // a cacheable negative entry
		return e, Errno(syscall.ENOENT)
	}
	return e, err
}

// Getattr stats a node.
func (c *FUSE) Getattr(node uint64) (Attr, error) {
	b, err := c.Do(OpGetattr, node, make([]byte, 16), attrOutSize)
	if err != nil {
		return Attr{}, err
	}
	if len(b) < attrOutSize {
		return Attr{}, fmt.Errorf("fuse: attr of %d bytes", len(b))
	}
	return parseAttr(b[16:]), nil
}

// Mkdir creates a directory.
func (c *FUSE) Mkdir(dir uint64, name string, mode uint32) (Entry, error) {
	in := make([]byte, 8)
	binary.LittleEndian.PutUint32(in, mode)
	b, err := c.DoParts(OpMkdir, dir, [][]byte{in, cstr(name)}, EntryOutSize)
	if err != nil {
		return Entry{}, err
	}
	return parseEntry(b)
}

// Mknod creates a node of mode (type bits included) with rdev.
func (c *FUSE) Mknod(dir uint64, name string, mode, rdev uint32) (Entry, error) {
	in := make([]byte, 16)
	binary.LittleEndian.PutUint32(in, mode)
	binary.LittleEndian.PutUint32(in[4:], rdev)
	b, err := c.DoParts(OpMknod, dir, [][]byte{in, cstr(name)}, EntryOutSize)
	if err != nil {
		return Entry{}, err
	}
	return parseEntry(b)
}

// Symlink creates name → target.
func (c *FUSE) Symlink(dir uint64, name, target string) (Entry, error) {
	b, err := c.DoParts(OpSymlink, dir, [][]byte{cstr(name), cstr(target)}, EntryOutSize)
	if err != nil {
		return Entry{}, err
	}
	return parseEntry(b)
}

// Link makes a hard link to node as dir/name.
func (c *FUSE) Link(node, dir uint64, name string) (Entry, error) {
	in := make([]byte, 8)
	binary.LittleEndian.PutUint64(in, node)
	b, err := c.DoParts(OpLink, dir, [][]byte{in, cstr(name)}, EntryOutSize)
	if err != nil {
		return Entry{}, err
	}
	return parseEntry(b)
}

// Rename moves dir/old to newdir/new.
func (c *FUSE) Rename(dir uint64, old string, newdir uint64, new string) error {
	in := make([]byte, 8)
	binary.LittleEndian.PutUint64(in, newdir)
	_, err := c.DoParts(OpRename, dir, [][]byte{in, cstr(old), cstr(new)}, 0)
	return err
}

// Unlink removes dir/name.
func (c *FUSE) Unlink(dir uint64, name string) error {
	_, err := c.Do(OpUnlink, dir, cstr(name), 0)
	return err
}

// Create creates and opens dir/name.
func (c *FUSE) Create(dir uint64, name string, flags, mode uint32) (Entry, uint64, error) {
	in := make([]byte, 16)
	binary.LittleEndian.PutUint32(in, flags)
	binary.LittleEndian.PutUint32(in[4:], mode)
	b, err := c.DoParts(OpCreate, dir, [][]byte{in, cstr(name)}, EntryOutSize+16)
	if err != nil {
		return Entry{}, 0, err
	}
	e, err := parseEntry(b)
	if err != nil || len(b) < EntryOutSize+16 {
		return e, 0, fmt.Errorf("fuse: create reply of %d bytes", len(b))
	}
	return e, binary.LittleEndian.Uint64(b[EntryOutSize:]), nil
}

// Open opens a node and returns the file handle.
func (c *FUSE) Open(node uint64, flags uint32) (uint64, error) {
	in := make([]byte, 8)
	binary.LittleEndian.PutUint32(in, flags)
	b, err := c.Do(OpOpen, node, in, 16)
	if err != nil {
		return 0, err
	}
	if len(b) < 16 {
		return 0, fmt.Errorf("fuse: open reply of %d bytes", len(b))
	}
	return binary.LittleEndian.Uint64(b), nil
}

// Read reads up to n bytes at off.
func (c *FUSE) Read(node, fh, off uint64, n uint32) ([]byte, error) {
	return c.ReadInto(nil, node, fh, off, n)
}

// ReadInto is Read with the data appended to dst[:0].
func (c *FUSE) ReadInto(dst []byte, node, fh, off uint64, n uint32) ([]byte, error) {
	var in [40]byte
	binary.LittleEndian.PutUint64(in[:], fh)
	binary.LittleEndian.PutUint64(in[8:], off)
	binary.LittleEndian.PutUint32(in[16:], n)
	return c.DoInto(dst, OpRead, node, [][]byte{in[:]}, int(n))
}

// Write writes data at off.
func (c *FUSE) Write(node, fh, off uint64, data []byte) (uint32, error) {
	in := make([]byte, 40)
	binary.LittleEndian.PutUint64(in, fh)
	binary.LittleEndian.PutUint64(in[8:], off)
	binary.LittleEndian.PutUint32(in[16:], uint32(len(data)))
	b, err := c.DoParts(OpWrite, node, [][]byte{in, data}, 8)
	if err != nil {
		return 0, err
	}
	if len(b) < 8 {
		return 0, fmt.Errorf("fuse: write reply of %d bytes", len(b))
	}
	return binary.LittleEndian.Uint32(b), nil
}

// Release closes a file handle.
func (c *FUSE) Release(node, fh uint64) error {
	in := make([]byte, 24)
	binary.LittleEndian.PutUint64(in, fh)
	_, err := c.Do(OpRelease, node, in, 0)
	return err
}

// Readlink reads a symlink node.
func (c *FUSE) Readlink(node uint64) (string, error) {
	b, err := c.Do(OpReadlink, node, nil, 4096)
	return string(b), err
}

// Forget drops n lookups of node (no reply).
func (c *FUSE) Forget(node, n uint64) error {
	in := make([]byte, 8)
	binary.LittleEndian.PutUint64(in, n)
	_, err := c.Do(OpForget, node, in, 0)
	return err
}

// Submit publishes a request with buffers of its own and returns without waiting; WaitAny
// collects completions. Tests use it to keep a request outstanding while others run.
func (c *FUSE) Submit(op uint32, nodeid uint64, body []byte, outLen int) (uint16, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.unique++
	n := inHeaderSize + len(body)
	in := c.f.Alloc(uint64(n), 8)
	out := c.f.Alloc(uint64(outHeaderSize+outLen), 8)
	m := c.f.Mem
	binary.LittleEndian.PutUint32(m[in:], uint32(n))
	binary.LittleEndian.PutUint32(m[in+4:], op)
	binary.LittleEndian.PutUint64(m[in+8:], c.unique)
	binary.LittleEndian.PutUint64(m[in+16:], nodeid)
	copy(m[in+inHeaderSize:], body)
	head, ok := c.q.Add([]Buf{{Addr: in, Len: uint32(n)}, {Addr: out, Len: uint32(outHeaderSize + outLen), Write: true}})
	if !ok {
		return 0, fmt.Errorf("fuse: request queue full")
	}
	return head, c.q.Kick()
}

// WaitAny waits for completions of submitted requests.
func (c *FUSE) WaitAny(timeout time.Duration) ([]Used, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.q.Wait(timeout)
}
