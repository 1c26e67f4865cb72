package frame

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
)

// ErrMalformed is wrapped by every packet parsing error.
var ErrMalformed = errors.New("frame: malformed packet")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
}

// ARP is an Ethernet/IPv4 ARP packet.
type ARP struct {
	Op        uint16 // 1 request, 2 reply
	SenderMAC MAC
	SenderIP  netip.Addr
	TargetMAC MAC
	TargetIP  netip.Addr
}

// ARP operations.
const (
	ARPRequest = 1
	ARPReply   = 2
)

// ParseARP parses the ARP packet in the Ethernet frame f.
func ParseARP(f []byte) (ARP, error) {
	if len(f) < EthHeaderLen+28 {
		return ARP{}, malformed("arp: %d bytes", len(f))
	}
	p := f[EthHeaderLen:]
	if binary.BigEndian.Uint16(p[0:2]) != 1 || binary.BigEndian.Uint16(p[2:4]) != TypeIPv4 || p[4] != 6 || p[5] != 4 {
		return ARP{}, malformed("arp: not Ethernet/IPv4")
	}
	var a ARP
	a.Op = binary.BigEndian.Uint16(p[6:8])
	copy(a.SenderMAC[:], p[8:14])
	a.SenderIP = netip.AddrFrom4([4]byte(p[14:18]))
	copy(a.TargetMAC[:], p[18:24])
	a.TargetIP = netip.AddrFrom4([4]byte(p[24:28]))
	return a, nil
}

// IP protocol numbers.
const (
	ProtoICMP = 1
	ProtoTCP  = 6
	ProtoUDP  = 17
)

// IPv4 is the part of an IPv4 header the switch inspects.
type IPv4 struct {
	Src, Dst netip.Addr
	Proto    uint8
	TTL      uint8
	// Fragment is true for any fragment but the first (no transport header).
	Fragment bool
}

// ParseIPv4 parses the IPv4 packet in the Ethernet frame f and returns its header and payload.
func ParseIPv4(f []byte) (IPv4, []byte, error) {
	if len(f) < EthHeaderLen+20 {
		return IPv4{}, nil, malformed("ipv4: %d bytes", len(f))
	}
	p := f[EthHeaderLen:]
	if p[0]>>4 != 4 {
		return IPv4{}, nil, malformed("ipv4: version %d", p[0]>>4)
	}
	hl := int(p[0]&0xf) * 4
	tl := int(binary.BigEndian.Uint16(p[2:4]))
	if hl < 20 || tl < hl || tl > len(p) {
		return IPv4{}, nil, malformed("ipv4: header %d, total %d, have %d", hl, tl, len(p))
	}
	h := IPv4{
		Src:      netip.AddrFrom4([4]byte(p[12:16])),
		Dst:      netip.AddrFrom4([4]byte(p[16:20])),
		Proto:    p[9],
		TTL:      p[8],
		Fragment: binary.BigEndian.Uint16(p[6:8])&0x1fff != 0,
	}
	return h, p[hl:tl], nil
}

// UDP is a parsed UDP datagram.
type UDP struct {
	SrcPort, DstPort uint16
	Payload          []byte
}

// ParseUDP parses a UDP datagram (the payload of ParseIPv4).
func ParseUDP(p []byte) (UDP, error) {
	if len(p) < 8 {
		return UDP{}, malformed("udp: %d bytes", len(p))
	}
	n := int(binary.BigEndian.Uint16(p[4:6]))
	if n < 8 || n > len(p) {
		return UDP{}, malformed("udp: length %d, have %d", n, len(p))
	}
	return UDP{
		SrcPort: binary.BigEndian.Uint16(p[0:2]),
		DstPort: binary.BigEndian.Uint16(p[2:4]),
		Payload: p[8:n],
	}, nil
}

// BuildUDP4 returns an Ethernet frame carrying payload in a UDP/IPv4 datagram, checksums filled in.
func BuildUDP4(dstMAC, srcMAC MAC, src, dst netip.AddrPort, payload []byte) []byte {
	f := make([]byte, EthHeaderLen+20+8+len(payload))
	PutEth(f, dstMAC, srcMAC, TypeIPv4)
	ip := f[EthHeaderLen:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:4], uint16(20+8+len(payload)))
	ip[8] = 64
	ip[9] = ProtoUDP
	s4, d4 := src.Addr().As4(), dst.Addr().As4()
	copy(ip[12:16], s4[:])
	copy(ip[16:20], d4[:])
	binary.BigEndian.PutUint16(ip[10:12], ^checksum(ip[:20], 0))
	u := ip[20:]
	binary.BigEndian.PutUint16(u[0:2], src.Port())
	binary.BigEndian.PutUint16(u[2:4], dst.Port())
	binary.BigEndian.PutUint16(u[4:6], uint16(8+len(payload)))
	copy(u[8:], payload)
	// Pseudo-header sum.
	var ph [12]byte
	copy(ph[0:4], s4[:])
	copy(ph[4:8], d4[:])
	ph[9] = ProtoUDP
	binary.BigEndian.PutUint16(ph[10:12], uint16(8+len(payload)))
	cs := ^checksum(u, checksum(ph[:], 0))
	if cs == 0 {
		cs = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:8], cs)
	return f
}

// checksum folds the ones' complement sum of b into initial. Bulk offload traffic runs every byte
// through here, so it adds little-endian 32-bit words into four independent 64-bit accumulators
// (no carries to track: 2^32 words would be needed to overflow one) and swaps the folded result
// into network order at the end; the ones' complement sum is byte-order independent (RFC 1071).
func checksum(b []byte, initial uint16) uint16 {
	le := binary.LittleEndian
	var a0, a1, a2, a3 uint64
	for len(b) >= 64 {
		a0 += uint64(le.Uint32(b[0:])) + uint64(le.Uint32(b[16:])) + uint64(le.Uint32(b[32:])) + uint64(le.Uint32(b[48:]))
		a1 += uint64(le.Uint32(b[4:])) + uint64(le.Uint32(b[20:])) + uint64(le.Uint32(b[36:])) + uint64(le.Uint32(b[52:]))
		a2 += uint64(le.Uint32(b[8:])) + uint64(le.Uint32(b[24:])) + uint64(le.Uint32(b[40:])) + uint64(le.Uint32(b[56:]))
		a3 += uint64(le.Uint32(b[12:])) + uint64(le.Uint32(b[28:])) + uint64(le.Uint32(b[44:])) + uint64(le.Uint32(b[60:]))
		b = b[64:]
	}
	for len(b) >= 4 {
		a0 += uint64(le.Uint32(b))
		b = b[4:]
	}
	if len(b) >= 2 {
		a1 += uint64(le.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		a2 += uint64(b[0]) // the low byte in little-endian order is the high byte on the wire
	}
	sum, c0 := bits.Add64(a0, a1, 0)
	sum, c1 := bits.Add64(sum, a2, 0)
	sum, c2 := bits.Add64(sum, a3, 0)
	sum, c3 := bits.Add64(sum, c0+c1+c2, 0) // each carry out of bit 64 is worth 2^64 ≡ 1
	sum += c3
	s := (sum >> 32) + (sum & 0xffffffff)
	s = (s >> 32) + (s & 0xffffffff)
	s = (s >> 16) + (s & 0xffff)
	s = (s >> 16) + (s & 0xffff)
	s = (s >> 16) + (s & 0xffff)
	t := uint32(bits.ReverseBytes16(uint16(s))) + uint32(initial)
	return uint16((t >> 16) + (t & 0xffff))
}

// Checksum returns the Internet checksum of b (0 when b carries a valid checksum).
func Checksum(b []byte) uint16 { return ^checksum(b, 0) }

// BuildIPv4 returns an Ethernet frame carrying payload in an IPv4 packet of protocol proto, the
// header checksum filled in (the payload's own checksum is the caller's).
func BuildIPv4(dstMAC, srcMAC MAC, src, dst netip.Addr, proto uint8, payload []byte) []byte {
	f := make([]byte, EthHeaderLen+20+len(payload))
	PutEth(f, dstMAC, srcMAC, TypeIPv4)
	ip := f[EthHeaderLen:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:4], uint16(20+len(payload)))
	ip[8] = 64
	ip[9] = proto
	s4, d4 := src.As4(), dst.As4()
	copy(ip[12:16], s4[:])
	copy(ip[16:20], d4[:])
	binary.BigEndian.PutUint16(ip[10:12], ^checksum(ip[:20], 0))
	copy(ip[20:], payload)
	return f
}

// FixChecksum recomputes the TCP or UDP checksum of the IPv4 packet in the Ethernet frame f in
// place. It completes packets handed over with the checksum left to "hardware" (a tap's
// CHECKSUM_PARTIAL, a netstack's segmentation offload), whatever partial sum the field holds. It
// reports false, leaving f alone, for anything else.
func FixChecksum(f []byte) bool {
	start, off, ok := L4Checksum(f)
	if !ok {
		return false
	}
	ip := f[EthHeaderLen:]
	l4 := f[start : EthHeaderLen+int(binary.BigEndian.Uint16(ip[2:4]))]
	l4[off], l4[off+1] = 0, 0
	var ph [12]byte
	copy(ph[0:8], ip[12:20])
	ph[9] = ip[9]
	binary.BigEndian.PutUint16(ph[10:12], uint16(len(l4)))
	cs := ^checksum(l4, checksum(ph[:], 0))
	if cs == 0 && ip[9] == ProtoUDP {
		cs = 0xffff
	}
	binary.BigEndian.PutUint16(l4[off:], cs)
	return true
}

// L4Checksum locates the TCP or UDP checksum of the IPv4 packet in the Ethernet frame f: start is
// where the L4 header begins in f and off the checksum's offset from there (virtio-net's
// csum_start and csum_offset). ok is false for anything else, fragments and inconsistent lengths.
func L4Checksum(f []byte) (start, off int, ok bool) {
	if len(f) < EthHeaderLen+20 || Type(f) != TypeIPv4 {
		return 0, 0, false
	}
	ip := f[EthHeaderLen:]
	hl := int(ip[0]&0xf) * 4
	tl := int(binary.BigEndian.Uint16(ip[2:4]))
	if ip[0]>>4 != 4 || hl < 20 || tl < hl || tl > len(ip) || binary.BigEndian.Uint16(ip[6:8])&0x3fff != 0 {
		return 0, 0, false // not IPv4, inconsistent, or a fragment
	}
	switch ip[9] {
	case ProtoTCP:
		off = 16
	case ProtoUDP:
		off = 6
	default:
		return 0, 0, false
	}
	if tl-hl < off+2 {
		return 0, 0, false
	}
	return EthHeaderLen + hl, off, true
}
