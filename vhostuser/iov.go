package vhostuser

// Helpers for the scatter-gather vectors a Chain holds (guest buffers in descriptor order),
// shared by the backends.

// IovLen is the number of bytes in iov.
func IovLen(iov [][]byte) int {
	n := 0
	for _, b := range iov {
		n += len(b)
	}
	return n
}

// Gather copies iov's bytes from offset off on into dst, up to len(dst), and returns how many it
// copied.
func Gather(dst []byte, iov [][]byte, off int) int {
	n := 0
	for _, b := range iov {
		if n == len(dst) {
			break
		}
		if off >= len(b) {
			off -= len(b)
			continue
		}
		n += copy(dst[n:], b[off:])
		off = 0
	}
	return n
}

// Scatter copies src into iov from offset off on and returns how many bytes it copied (fewer
// than len(src) when iov ends first).
func Scatter(iov [][]byte, off int, src []byte) int {
	n := 0
	for _, b := range iov {
		if n == len(src) {
			break
		}
		if off >= len(b) {
			off -= len(b)
			continue
		}
		n += copy(b[off:], src[n:])
		off = 0
	}
	return n
}

// AppendRange appends to dst the pieces of iov that hold bytes [off, off+n), without copying
// them, and returns the extended slice.
func AppendRange(dst, iov [][]byte, off, n int) [][]byte {
	for _, b := range iov {
		if n <= 0 {
			break
		}
		if off >= len(b) {
			off -= len(b)
			continue
		}
		b = b[off:]
		off = 0
		b = b[:min(len(b), n)]
		n -= len(b)
		dst = append(dst, b)
	}
	return dst
}
