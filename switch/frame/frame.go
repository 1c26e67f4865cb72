// Package frame is the wire format between virtkit's switch and its peers: Ethernet frames, each
// preceded by a 4-byte big-endian length (the "qemu" stream framing that QEMU's -netdev stream and
// gvproxy's -listen-qemu speak), plus the few Ethernet header accessors the switch and the guest
// relay need.
//
// Checksum offload extension: a virtkit relay opens a connection with a Hello control frame
// (EtherType TypeControl, never forwarded); a virtkit switch answers HelloAck. From then on either
// side may set FlagPartial in a frame's length prefix: the frame is an IPv4 TCP or UDP packet
// whose checksum field holds only the pseudo-header sum (Linux's CHECKSUM_PARTIAL, virtio-net's
// NEEDS_CSUM), to be completed by whoever needs a complete one. The receiving relay hands such
// frames to its tap as NEEDS_CSUM, so no side ever sums the payload of bulk traffic; the switch
// completes them (FixChecksum) only for ports that did not negotiate. Peers that know nothing of
// it (QEMU, gvproxy) ignore the Hello, never see a flag and keep getting complete checksums.
//
// It is used by the guest agent, so it must not depend on gVisor or anything heavy. A Reader or a
// Writer belongs to one goroutine at a time; the package has no other state.
package frame

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

const (
	// HeaderLen is the size of the length prefix.
	HeaderLen = 4
	// EthHeaderLen is the size of an untagged Ethernet header.
	EthHeaderLen = 14
	// MaxMTU is the largest MTU a port may use (the largest that QEMU and gvproxy accept).
	MaxMTU = 65520
	// MaxLen is the largest frame accepted on a port: an Ethernet header and the largest IP packet.
	MaxLen = EthHeaderLen + 65535
	// MinLen is the smallest frame accepted: an Ethernet header.
	MinLen = EthHeaderLen
)

// EtherTypes the switch cares about.
const (
	TypeIPv4 = 0x0800
	TypeARP  = 0x0806
	TypeIPv6 = 0x86dd
	// TypeControl carries the relay↔switch negotiation (IEEE 802 local experimental EtherType).
	TypeControl = 0x88b5
)

// FlagPartial in a length prefix marks a frame whose L4 checksum is partial (see the package doc).
const FlagPartial = 1 << 31

// Errors that poison a stream: after one the peer is out of sync and the connection must be closed.
var (
	ErrTooLarge = errors.New("frame: length above the maximum")
	ErrTooSmall = errors.New("frame: length below an Ethernet header")
)

// LengthError reports a bad length prefix; it wraps ErrTooLarge or ErrTooSmall.
type LengthError struct {
	Len uint32
	Err error
}

func (e *LengthError) Error() string { return fmt.Sprintf("%v: %d bytes", e.Err, e.Len) }
func (e *LengthError) Unwrap() error { return e.Err }

// Reader reads length-prefixed frames from a stream.
//
// It keeps its own buffer rather than a bufio.Reader: bufio slides the unread part of a partly
// read frame to the front on every fill, which for a stream of 64 KiB frames copied about half
// of all bytes once more. Here the unread part moves only when a frame would not fit in the
// space left, which with a buffer of several maximal frames is rare.
//
// With SetAlloc, frames of a given size or more that are not buffered yet go from the stream
// straight into memory the owner supplies (the switch: a netstack buffer), so bulk traffic
// crosses from the kernel into its final place with one copy.
type Reader struct {
	rd      io.Reader
	raw     syscall.RawConn // rd's, for readv; nil when rd is not a file or socket
	buf     []byte
	r, w    int
	err     error // the stream's read error, returned once the buffered frames are used up
	max     int
	accept  bool // FlagPartial is allowed (AcceptPartial)
	partial bool // the last frame carried FlagPartial

	allocMin  int
	alloc     func(n int) []byte
	allocated bool
}

// AcceptPartial lets frames carry FlagPartial; before it, a flagged prefix is a bad length.
func (r *Reader) AcceptPartial() { r.accept = true }

// Partial reports whether the frame Next returned last has a partial checksum.
func (r *Reader) Partial() bool { return r.partial }

// SetAlloc makes Next read a frame of at least min bytes that is not completely buffered into
// alloc(n) (which returns n bytes, or nil to use the reader's buffer), mostly straight from the
// stream. Allocated reports when it did.
func (r *Reader) SetAlloc(min int, alloc func(n int) []byte) { r.allocMin, r.alloc = min, alloc }

// Allocated reports whether the frame Next returned last is in memory from SetAlloc's alloc.
func (r *Reader) Allocated() bool { return r.allocated }

// NewReader returns a Reader that refuses frames longer than max (MaxLen if max <= 0). Its buffer
// holds several maximal frames, so Next returns frames without copying.
func NewReader(rd io.Reader, max int) *Reader {
	if max <= 0 || max > MaxLen {
		max = MaxLen
	}
	size := 4 * (max + HeaderLen)
	if size < 256<<10 {
		size = 256 << 10
	}
	r := &Reader{rd: rd, buf: make([]byte, size), max: max}
	if sc, ok := rd.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			r.raw = raw
		}
	}
	return r
}

// fill reads once more into the buffer, first moving the unread bytes to the front when fewer
// than need bytes fit after them. short limits the read to spill bytes: large frames are coming,
// and the next one should go straight into its own memory (readInto) rather than through the
// buffer.
func (r *Reader) fill(need int, short bool) error {
	if r.err != nil {
		return r.err
	}
	if r.r == r.w {
		r.r, r.w = 0, 0
	} else if len(r.buf)-r.r < need {
		r.w = copy(r.buf, r.buf[r.r:r.w])
		r.r = 0
	}
	end := len(r.buf)
	if short && r.w+spill >= need {
		end = min(end, r.w+spill)
	}
	for i := 0; i < 100; i++ {
		n, err := r.rd.Read(r.buf[r.w:end])
		r.w += n
		if err != nil {
			r.err = err
			if n > 0 {
				return nil
			}
			return err
		}
		if n > 0 {
			return nil
		}
	}
	r.err = io.ErrNoProgress
	return r.err
}

// Next returns the next frame. The slice is only valid until the following call (unless
// Allocated). A bad length is a *LengthError; the stream cannot be resynchronised after one.
func (r *Reader) Next() ([]byte, error) {
	bulk := r.allocated // the last frame went into alloc'd memory: more large ones are likely
	r.allocated = false
	for r.w-r.r < HeaderLen {
		if err := r.fill(HeaderLen, bulk); err != nil {
			if err == io.EOF && r.w > r.r {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	n := binary.BigEndian.Uint32(r.buf[r.r:])
	r.partial = r.accept && n&FlagPartial != 0
	if r.partial {
		n &^= FlagPartial
	}
	if n > uint32(r.max) {
		return nil, &LengthError{Len: n, Err: ErrTooLarge}
	}
	if n < MinLen {
		return nil, &LengthError{Len: n, Err: ErrTooSmall}
	}
	total := HeaderLen + int(n)
	if r.alloc != nil && int(n) >= r.allocMin && r.w-r.r < total && r.err == nil {
		if dst := r.alloc(int(n)); len(dst) == int(n) {
			return r.readInto(dst)
		}
	}
	for r.w-r.r < total {
		if err := r.fill(total, false); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	f := r.buf[r.r+HeaderLen : r.r+total]
	r.r += total
	return f, nil
}

// spill is how much of what follows a frame read by readInto may land in the buffer in the same
// system call: enough for the next prefix and small frames, little enough that the next large
// frame mostly goes straight to its own memory too.
const spill = 4096

// readInto reads the frame whose prefix is buffered into dst: the buffered part is copied, the
// rest read from the stream, and with readv whatever follows it into the buffer in the same call.
func (r *Reader) readInto(dst []byte) ([]byte, error) {
	k := copy(dst, r.buf[r.r+HeaderLen:r.w])
	r.r, r.w = 0, 0 // everything buffered belonged to this frame
	for k < len(dst) {
		var n int
		var err error
		if r.raw != nil {
			n, err = r.readv(dst[k:], r.buf[:spill])
		} else {
			n, err = r.rd.Read(dst[k:])
		}
		if n > len(dst)-k {
			r.w = n - (len(dst) - k)
			n = len(dst) - k
		}
		k += n
		if err != nil && k < len(dst) {
			r.err = err
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		if err != nil {
			r.err = err // the frame is complete; the error comes with the next call
		}
	}
	r.allocated = true
	return dst, nil
}

// readv reads into a then b with one system call, waiting in the runtime's poller.
func (r *Reader) readv(a, b []byte) (int, error) {
	var (
		n    int
		rerr error
	)
	iov := [2][]byte{a, b}
	err := r.raw.Read(func(fd uintptr) bool {
		n, rerr = unix.Readv(int(fd), iov[:])
		return rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

// Buffered reports whether a complete frame is already buffered (so Next will not block).
func (r *Reader) Buffered() bool {
	if r.w-r.r < HeaderLen {
		return false
	}
	n := binary.BigEndian.Uint32(r.buf[r.r:])
	if r.accept {
		n &^= FlagPartial
	}
	return r.w-r.r >= HeaderLen+int(n)
}

// PutHeader writes the length prefix of an n-byte frame into b[:HeaderLen].
func PutHeader(b []byte, n int) { binary.BigEndian.PutUint32(b, uint32(n)) }

// PutHeaderPartial writes the length prefix of an n-byte frame with a partial checksum.
func PutHeaderPartial(b []byte, n int) { binary.BigEndian.PutUint32(b, uint32(n)|FlagPartial) }

// SetPartial marks the frame whose prefix is b[:HeaderLen] as having a partial checksum.
func SetPartial(b []byte) { b[0] |= FlagPartial >> 24 }

// Append appends f with its length prefix to b.
func Append(b, f []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
	return append(b, f...)
}

// Writer writes length-prefixed frames.
type Writer struct {
	w   io.Writer
	hdr [HeaderLen]byte
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Write writes one frame with a single writev where w is a socket.
func (w *Writer) Write(f []byte) error {
	PutHeader(w.hdr[:], len(f))
	bufs := net.Buffers{w.hdr[:], f}
	_, err := bufs.WriteTo(w.w)
	return err
}

// MAC is an Ethernet address.
type MAC [6]byte

// Broadcast is ff:ff:ff:ff:ff:ff.
var Broadcast = MAC{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// IsMulticast reports whether m is a group address (broadcast included).
func (m MAC) IsMulticast() bool { return m[0]&1 == 1 }

// IsZero reports whether m is 00:00:00:00:00:00.
func (m MAC) IsZero() bool { return m == MAC{} }

func (m MAC) String() string { return net.HardwareAddr(m[:]).String() }

// HW returns m as a net.HardwareAddr.
func (m MAC) HW() net.HardwareAddr { return append(net.HardwareAddr(nil), m[:]...) }

// MACFrom converts a 6-byte hardware address; ok is false for any other length.
func MACFrom(hw net.HardwareAddr) (m MAC, ok bool) {
	if len(hw) != 6 {
		return MAC{}, false
	}
	copy(m[:], hw)
	return m, true
}

// Dst returns a frame's destination MAC; f must be at least EthHeaderLen long.
func Dst(f []byte) (m MAC) { copy(m[:], f[0:6]); return }

// Src returns a frame's source MAC; f must be at least EthHeaderLen long.
func Src(f []byte) (m MAC) { copy(m[:], f[6:12]); return }

// Type returns a frame's EtherType; f must be at least EthHeaderLen long.
func Type(f []byte) uint16 { return binary.BigEndian.Uint16(f[12:14]) }

// PutEth writes an Ethernet header into f[:EthHeaderLen].
func PutEth(f []byte, dst, src MAC, typ uint16) {
	copy(f[0:6], dst[:])
	copy(f[6:12], src[:])
	binary.BigEndian.PutUint16(f[12:14], typ)
}

// Control messages (payload of a TypeControl frame).
const (
	helloMsg    = "virtkit-net/1 csum-partial"
	helloAckMsg = "virtkit-net/1 csum-partial ok"
)

// Hello is the frame a relay sends first to offer partial checksums.
func Hello(src MAC) []byte { return control(Broadcast, src, helloMsg) }

// HelloAck is the switch's answer: from now on both sides may send FlagPartial frames.
func HelloAck(dst, src MAC) []byte { return control(dst, src, helloAckMsg) }

func control(dst, src MAC, msg string) []byte {
	f := make([]byte, EthHeaderLen+len(msg))
	PutEth(f, dst, src, TypeControl)
	copy(f[EthHeaderLen:], msg)
	return f
}

// IsHello and IsHelloAck recognise the control frames; anything else of TypeControl is ignored.
func IsHello(f []byte) bool    { return isControl(f, helloMsg) }
func IsHelloAck(f []byte) bool { return isControl(f, helloAckMsg) }

func isControl(f []byte, msg string) bool {
	return len(f) >= EthHeaderLen && Type(f) == TypeControl && string(f[EthHeaderLen:]) == msg
}
