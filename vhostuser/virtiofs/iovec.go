package virtiofs

import (
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A guest's 1 MiB READ or WRITE arrives as 256 page-sized pieces of guest memory. x/sys/unix's
// Preadv and Pwritev build their iovec array afresh on every call, growing it from 8 entries:
// ~8 KiB of garbage per request, a garbage collection every few hundred requests, and with each
// collection the runtime's sysmon polling every 20 µs for a millisecond. preadv and pwritev
// below fill an array kept in a pool instead, merge pieces that are adjacent in memory (guest
// pages often are), and split calls at the kernel's IOV_MAX.

// iovMax is the kernel's limit on iovecs per call (UIO_MAXIOV).
const iovMax = 1024

var iovPool = sync.Pool{New: func() any { s := make([]unix.Iovec, 0, 260); return &s }}

// appendIovecs appends bufs to dst as iovecs, merging a buffer that starts where the previous
// one ends and skipping empty ones.
func appendIovecs(dst []unix.Iovec, bufs [][]byte) []unix.Iovec {
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		if n := len(dst); n > 0 {
			last := &dst[n-1]
			if uintptr(unsafe.Pointer(last.Base))+uintptr(last.Len) == uintptr(unsafe.Pointer(&b[0])) {
				last.Len += uint64(len(b))
				continue
			}
		}
		dst = append(dst, unix.Iovec{Base: &b[0], Len: uint64(len(b))})
	}
	return dst
}

// preadv reads into bufs from fd at off, like unix.Preadv without the garbage; it stops at the
// first short read.
func preadv(fd int, bufs [][]byte, off int64) (int, error) {
	return iovCall(unix.SYS_PREADV, fd, bufs, off)
}

// pwritev writes bufs to fd at off, like unix.Pwritev without the garbage; it stops at the
// first short write.
func pwritev(fd int, bufs [][]byte, off int64) (int, error) {
	return iovCall(unix.SYS_PWRITEV, fd, bufs, off)
}

func iovCall(trap uintptr, fd int, bufs [][]byte, off int64) (int, error) {
	p := iovPool.Get().(*[]unix.Iovec)
	all := appendIovecs((*p)[:0], bufs)
	defer func() {
		clear(all) // the pool must not keep guest memory reachable
		*p = all[:0]
		iovPool.Put(p)
	}()
	iov := all
	total := 0
	for len(iov) > 0 {
		chunk := iov[:min(len(iov), iovMax)]
		want := 0
		for _, v := range chunk {
			want += int(v.Len)
		}
		// pos_l and pos_h: the whole offset in pos_l where a long has 64 bits (x/sys's offs2lohi).
		lo, hi := uintptr(off), uintptr(uint64(off)>>(unsafe.Sizeof(uintptr(0))*8-1)>>1)
		r, _, e := unix.Syscall6(trap, uintptr(fd), uintptr(unsafe.Pointer(&chunk[0])), uintptr(len(chunk)), lo, hi, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			if total > 0 {
				return total, nil // what was done stands; the error shows on the next call
			}
			return 0, e
		}
		total += int(r)
		off += int64(r)
		if int(r) < want {
			break
		}
		iov = iov[len(chunk):]
	}
	return total, nil
}
