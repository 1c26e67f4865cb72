// Package frame is the wire format between virtkit's switch and its peers: Ethernet frames, each
// preceded by a 4-byte big-endian length (the "qemu" stream framing that QEMU's -netdev stream and
// gvproxy's -listen-qemu speak), plus the few Ethernet header accessors the switch and the guest
// relay need.
//
// It is used by the guest agent, so it must not depend on gVisor or anything heavy. A Reader or a
// Writer belongs to one goroutine at a time; the package has no other state.
package frame

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
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
)

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
type Reader struct {
	br  *bufio.Reader
	max int
}

// NewReader returns a Reader that refuses frames longer than max (MaxLen if max <= 0). Its buffer
// holds at least one maximal frame, so Next returns frames without copying.
func NewReader(r io.Reader, max int) *Reader {
	if max <= 0 || max > MaxLen {
		max = MaxLen
	}
	size := 2 * (max + HeaderLen)
	if size < 256<<10 {
		size = 256 << 10
	}
	return &Reader{br: bufio.NewReaderSize(r, size), max: max}
}

// Next returns the next frame. The slice is only valid until the following call. A bad length is
// a *LengthError; the stream cannot be resynchronised after one.
func (r *Reader) Next() ([]byte, error) {
	h, err := r.br.Peek(HeaderLen)
	if err != nil {
		if err == io.EOF && len(h) > 0 {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	n := binary.BigEndian.Uint32(h)
	if n > uint32(r.max) {
		return nil, &LengthError{Len: n, Err: ErrTooLarge}
	}
	if n < MinLen {
		return nil, &LengthError{Len: n, Err: ErrTooSmall}
	}
	b, err := r.br.Peek(HeaderLen + int(n))
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	r.br.Discard(HeaderLen + int(n))
	return b[HeaderLen:], nil
}

// Buffered reports whether a complete frame is already buffered (so Next will not block).
func (r *Reader) Buffered() bool {
	if r.br.Buffered() < HeaderLen {
		return false
	}
	h, _ := r.br.Peek(HeaderLen)
	n := int(binary.BigEndian.Uint32(h))
	return r.br.Buffered() >= HeaderLen+n
}

// PutHeader writes the length prefix of an n-byte frame into b[:HeaderLen].
func PutHeader(b []byte, n int) { binary.BigEndian.PutUint32(b, uint32(n)) }

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
