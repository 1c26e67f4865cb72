package virtiofs

import (
	"bytes"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/virtkit/virtkit/vhostuser"
)

// fastPath answers the requests a guest sends by the thousand (LOOKUP, FORGET, GETATTR, OPEN,
// CREATE, READ, WRITE, FLUSH, RELEASE, UNLINK) straight from the virtqueue into the file system,
// keeping the request's fixed part and the reply in buffers that live as long as the goroutine
// popping the queue.
//
// Why it exists: go-fuse's ProtocolServer.HandleRequest allocates ~1.5 KiB per request (its
// request struct with inline buffers, and an interrupt channel). At a guest's pace, a request
// every few hundred µs, that memory was fresh each time: the runtime had handed the previous
// cycle's pages back to the kernel, so 0.5 page faults per create sequence (C virtiofsd: 0.06),
// and allocation, faults and GC were ~15% of the daemon's CPU in a guest's create loop.
//
// It is not a second FUSE decoder: anything it does not fully understand (request extensions,
// short structs, names longer than its buffer, go-fuse's poll-hack inode and name, a reply
// buffer too small, every other opcode) goes to go-fuse untouched, before the file system has
// been called, so errors and edge cases keep go-fuse's answers. Only sessions past FUSE_INIT use
// it (go-fuse negotiates the protocol, and requires minor 13+, where these structs have their
// current sizes). TestFastPathMatchesGoFuse and FuzzFastPath hold its replies to go-fuse's.
type fastPath struct {
	in  [64]uint64 // request header, fixed part and name; uint64 for the structs' alignment
	out [20]uint64 // reply header and body: fuse.OutHeader + the largest body, fuse.CreateOut
	iov [][]byte   // READ destination or WRITE source vector, reused
}

// FUSE opcodes the fast path answers.
const (
	opLookup  = 1
	opForget  = 2
	opGetattr = 3
	opUnlink  = 10
	opOpen    = 14
	opRead    = 15
	opWrite   = 16
	opRelease = 18
	opFlush   = 25
	opCreate  = 35
)

const (
	inHeaderSize  = int(unsafe.Sizeof(fuse.InHeader{}))
	outHeaderSize = int(unsafe.Sizeof(fuse.OutHeader{}))
	// go-fuse's poll hack: a LOOKUP of this name in the root, or any request on this inode, is
	// answered by go-fuse itself.
	pollHackName  = ".go-fuse-epoll-hack"
	pollHackInode = ^uint64(0)
)

// never is the cancel channel of fast-path requests: virtio-fs guests send no FUSE_INTERRUPT.
var never = make(chan struct{})

// serve answers the request in in, writing the reply to out, if it is one of the fast path's;
// ok false means nothing was done and go-fuse must answer it.
func (f *fastPath) serve(fs fuse.RawFileSystem, in, out [][]byte) (n int, ok bool) {
	inb := unsafe.Slice((*byte)(unsafe.Pointer(&f.in[0])), len(f.in)*8)
	total := vhostuser.IovLen(in)
	m := vhostuser.Gather(inb, in, 0)
	if m < inHeaderSize {
		return 0, false
	}
	p := unsafe.Pointer(&f.in[0])
	h := (*fuse.InHeader)(p)
	if h.TotalExtlen != 0 || h.NodeId == pollHackInode {
		return 0, false
	}
	outLen := vhostuser.IovLen(out)
	// fixed reports whether the opcode's input struct is all there and the reply fits.
	fixed := func(in uintptr, outBody int) bool {
		return m >= int(in) && outLen >= outHeaderSize+outBody
	}
	// name is the request's one file name (go-fuse's reading: up to the first NUL); ok false
	// when the request did not fit the buffer or names go-fuse's poll hack.
	name := func(off int) (string, bool) {
		if total > m || off > m {
			return "", false
		}
		b := inb[off:m]
		if i := bytes.IndexByte(b, 0); i >= 0 {
			b = b[:i]
		}
		if h.NodeId == fuse.FUSE_ROOT_ID && string(b) == pollHackName {
			return "", false
		}
		return string(b), true
	}
	body := unsafe.Pointer(&f.out[2]) // after the 16-byte fuse.OutHeader
	var st fuse.Status
	size := 0 // reply body size on success
	switch h.Opcode {
	case opLookup:
		nm, ok := name(inHeaderSize)
		if !ok || !fixed(0, int(unsafe.Sizeof(fuse.EntryOut{}))) {
			return 0, false
		}
		size = f.clear(unsafe.Sizeof(fuse.EntryOut{}))
		st = fs.Lookup(never, h, nm, (*fuse.EntryOut)(body))
	case opForget:
		if m < int(unsafe.Sizeof(fuse.ForgetIn{})) {
			return 0, false
		}
		fs.Forget(h.NodeId, (*fuse.ForgetIn)(p).Nlookup)
		return 0, true // no reply
	case opGetattr:
		if !fixed(unsafe.Sizeof(fuse.GetAttrIn{}), int(unsafe.Sizeof(fuse.AttrOut{}))) {
			return 0, false
		}
		size = f.clear(unsafe.Sizeof(fuse.AttrOut{}))
		st = fs.GetAttr(never, (*fuse.GetAttrIn)(p), (*fuse.AttrOut)(body))
	case opOpen:
		if !fixed(unsafe.Sizeof(fuse.OpenIn{}), int(unsafe.Sizeof(fuse.OpenOut{}))) {
			return 0, false
		}
		size = f.clear(unsafe.Sizeof(fuse.OpenOut{}))
		st = fs.Open(never, (*fuse.OpenIn)(p), (*fuse.OpenOut)(body))
	case opCreate:
		nm, ok := name(int(unsafe.Sizeof(fuse.CreateIn{})))
		if !ok || !fixed(unsafe.Sizeof(fuse.CreateIn{}), int(unsafe.Sizeof(fuse.CreateOut{}))) {
			return 0, false
		}
		size = f.clear(unsafe.Sizeof(fuse.CreateOut{}))
		st = fs.Create(never, (*fuse.CreateIn)(p), nm, (*fuse.CreateOut)(body))
	case opUnlink:
		nm, ok := name(inHeaderSize)
		if !ok || !fixed(0, 0) {
			return 0, false
		}
		st = fs.Unlink(never, h, nm)
	case opFlush:
		if !fixed(unsafe.Sizeof(fuse.FlushIn{}), 0) {
			return 0, false
		}
		st = fs.Flush(never, (*fuse.FlushIn)(p))
	case opRelease:
		if !fixed(unsafe.Sizeof(fuse.ReleaseIn{}), 0) {
			return 0, false
		}
		fs.Release(never, (*fuse.ReleaseIn)(p))
	case opWrite:
		const wo = int(unsafe.Sizeof(fuse.WriteOut{}))
		if !fixed(unsafe.Sizeof(fuse.WriteIn{}), wo) {
			return 0, false
		}
		in0 := int(unsafe.Sizeof(fuse.WriteIn{}))
		f.iov = vhostuser.AppendRange(f.iov[:0], in, in0, total-in0)
		size = f.clear(unsafe.Sizeof(fuse.WriteOut{}))
		wout := (*fuse.WriteOut)(body)
		wout.Size, st = fs.Writev(never, (*fuse.WriteIn)(p), f.iov)
		if st == fuse.ENOSYS { // a file system without Writev: go-fuse's fallback
			buf := make([]byte, total-in0)
			vhostuser.Gather(buf, f.iov, 0)
			wout.Size, st = fs.Write(never, (*fuse.WriteIn)(p), buf)
		}
		clear(f.iov)
	case opRead:
		rin := (*fuse.ReadIn)(p)
		if !fixed(unsafe.Sizeof(fuse.ReadIn{}), int(rin.Size)) {
			return 0, false
		}
		return f.read(fs, rin, out), true
	default:
		return 0, false
	}
	return f.reply(out, h.Unique, st, size, 0), true
}

// clear zeroes the reply body the file system is about to fill (go-fuse hands it a zeroed one)
// and returns its size.
func (f *fastPath) clear(size uintptr) int {
	clear(unsafe.Slice((*byte)(unsafe.Pointer(&f.out[2])), size))
	return int(size)
}

// reply writes the reply header and, on success, the body of size bytes from f.out, for a
// reply whose payload of n bytes the caller already put in place after them; it returns the
// bytes written. An error status carries neither, as in go-fuse.
func (f *fastPath) reply(out [][]byte, unique uint64, st fuse.Status, size, n int) int {
	if st != fuse.OK {
		size, n = 0, 0
	}
	oh := (*fuse.OutHeader)(unsafe.Pointer(&f.out[0]))
	*oh = fuse.OutHeader{Length: uint32(outHeaderSize + size + n), Status: int32(-st), Unique: unique}
	vhostuser.Scatter(out, 0, unsafe.Slice((*byte)(unsafe.Pointer(&f.out[0])), outHeaderSize+size))
	return outHeaderSize + size + n
}

// read answers READ: the file system's result is read straight into the reply's payload
// descriptors (preadv), as go-fuse does for a virtio-fs reply.
func (f *fastPath) read(fs fuse.RawFileSystem, in *fuse.ReadIn, out [][]byte) int {
	unique, size := in.Unique, int(in.Size)
	f.iov = vhostuser.AppendRange(f.iov[:0], out, outHeaderSize, size)
	var direct []byte // the payload as one slice, when the guest gave it one descriptor
	if len(f.iov) == 1 {
		direct = f.iov[0]
	}
	rr, st := fs.Read(never, in, direct)
	n := 0
	if st == fuse.OK && rr != nil {
		if rv, ok := rr.(interface {
			Readv([][]byte) (int, fuse.Status)
		}); ok {
			f.iov = vhostuser.AppendRange(f.iov[:0], out, outHeaderSize, rr.Size())
			n, st = rv.Readv(f.iov)
		} else {
			buf := direct
			if buf == nil {
				buf = make([]byte, size)
			}
			var b []byte
			if b, st = rr.Bytes(buf); st == fuse.OK {
				n = vhostuser.Scatter(f.iov, 0, b) // f.iov still covers the payload
			}
		}
	}
	if rr != nil {
		rr.Done()
	}
	clear(f.iov)
	return f.reply(out, unique, st, 0, n)
}
