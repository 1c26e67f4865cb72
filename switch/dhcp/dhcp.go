// Package dhcp is the DHCPv4 message format (RFC 2131/2132) and the two halves virtkit needs: the
// switch's static-lease server logic (Reply) and the guest relay's client exchange (Client).
//
// It is used by the guest agent, so it stays free of gVisor; it works on whole Ethernet frames with
// package frame. Messages are plain values; nothing here is shared between goroutines.
package dhcp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/virtkit/virtkit/switch/frame"
)

// Ports.
const (
	ServerPort = 67
	ClientPort = 68
)

// Message types (option 53).
const (
	Discover = 1
	Offer    = 2
	Request  = 3
	Decline  = 4
	Ack      = 5
	Nak      = 6
	Release  = 7
	Inform   = 8
)

// Option codes used here.
const (
	OptSubnetMask    = 1
	OptRouter        = 3
	OptDNS           = 6
	OptHostname      = 12
	OptDomainName    = 15
	OptMTU           = 26
	OptBroadcast     = 28
	OptRequestedIP   = 50
	OptLeaseTime     = 51
	OptMessageType   = 53
	OptServerID      = 54
	OptParamRequest  = 55
	OptRenewalTime   = 58
	OptRebindingTime = 59
	OptClientID      = 61
	OptSearch        = 119
	OptEnd           = 255
	OptPad           = 0
)

var magic = [4]byte{99, 130, 83, 99}

// ErrMalformed is wrapped by every parse error.
var ErrMalformed = errors.New("dhcp: malformed message")

// Message is a DHCPv4 message. Options keeps every option in wire order (repeated codes are
// concatenated as RFC 3396 asks).
type Message struct {
	Op      uint8 // 1 request, 2 reply
	XID     uint32
	Secs    uint16
	Flags   uint16
	CIAddr  netip.Addr
	YIAddr  netip.Addr
	SIAddr  netip.Addr
	GIAddr  netip.Addr
	CHAddr  frame.MAC
	Options map[uint8][]byte
}

// Type returns the message type option, 0 if absent.
func (m *Message) Type() uint8 {
	if v := m.Options[OptMessageType]; len(v) == 1 {
		return v[0]
	}
	return 0
}

// Addr returns a 4-byte option as an address.
func (m *Message) Addr(code uint8) (netip.Addr, bool) {
	v := m.Options[code]
	if len(v) != 4 {
		return netip.Addr{}, false
	}
	return netip.AddrFrom4([4]byte(v)), true
}

// Addrs returns an option holding a list of addresses.
func (m *Message) Addrs(code uint8) []netip.Addr {
	v := m.Options[code]
	var out []netip.Addr
	for len(v) >= 4 {
		out = append(out, netip.AddrFrom4([4]byte(v[:4])))
		v = v[4:]
	}
	return out
}

// Parse decodes a DHCP message (the UDP payload).
func Parse(b []byte) (*Message, error) {
	if len(b) < 240 {
		return nil, fmt.Errorf("%w: %d bytes, want at least 240", ErrMalformed, len(b))
	}
	if b[1] != 1 || b[2] != 6 {
		return nil, fmt.Errorf("%w: hardware type %d len %d, want Ethernet", ErrMalformed, b[1], b[2])
	}
	if [4]byte(b[236:240]) != magic {
		return nil, fmt.Errorf("%w: no magic cookie", ErrMalformed)
	}
	m := &Message{
		Op:      b[0],
		XID:     binary.BigEndian.Uint32(b[4:8]),
		Secs:    binary.BigEndian.Uint16(b[8:10]),
		Flags:   binary.BigEndian.Uint16(b[10:12]),
		CIAddr:  netip.AddrFrom4([4]byte(b[12:16])),
		YIAddr:  netip.AddrFrom4([4]byte(b[16:20])),
		SIAddr:  netip.AddrFrom4([4]byte(b[20:24])),
		GIAddr:  netip.AddrFrom4([4]byte(b[24:28])),
		Options: map[uint8][]byte{},
	}
	copy(m.CHAddr[:], b[28:34])
	o := b[240:]
	for len(o) > 0 {
		code := o[0]
		if code == OptEnd {
			break
		}
		if code == OptPad {
			o = o[1:]
			continue
		}
		if len(o) < 2 || len(o) < 2+int(o[1]) {
			return nil, fmt.Errorf("%w: option %d truncated", ErrMalformed, code)
		}
		n := int(o[1])
		m.Options[code] = append(m.Options[code], o[2:2+n]...)
		o = o[2+n:]
	}
	return m, nil
}

// Marshal encodes m; options are written in code order, long values split per RFC 3396.
func (m *Message) Marshal() []byte {
	b := make([]byte, 240, 576)
	b[0] = m.Op
	b[1], b[2] = 1, 6
	binary.BigEndian.PutUint32(b[4:8], m.XID)
	binary.BigEndian.PutUint16(b[8:10], m.Secs)
	binary.BigEndian.PutUint16(b[10:12], m.Flags)
	put4 := func(off int, a netip.Addr) {
		if a.Is4() {
			v := a.As4()
			copy(b[off:off+4], v[:])
		}
	}
	put4(12, m.CIAddr)
	put4(16, m.YIAddr)
	put4(20, m.SIAddr)
	put4(24, m.GIAddr)
	copy(b[28:34], m.CHAddr[:])
	copy(b[236:240], magic[:])
	// Message type first: some clients expect it.
	if v, ok := m.Options[OptMessageType]; ok {
		b = appendOpt(b, OptMessageType, v)
	}
	for code := 1; code < 255; code++ {
		if v, ok := m.Options[uint8(code)]; ok && code != OptMessageType {
			b = appendOpt(b, uint8(code), v)
		}
	}
	b = append(b, OptEnd)
	for len(b) < 300 { // BOOTP minimum, some clients insist
		b = append(b, OptPad)
	}
	return b
}

func appendOpt(b []byte, code uint8, v []byte) []byte {
	for first := true; first || len(v) > 0; first = false {
		n := min(len(v), 255)
		b = append(b, code, byte(n))
		b = append(b, v[:n]...)
		v = v[n:]
	}
	return b
}

// Lease is what the server hands one client.
type Lease struct {
	IP       netip.Prefix // address and subnet length
	Router   netip.Addr
	DNS      []netip.Addr
	Domain   string // search domain, e.g. "lan"
	Hostname string
	MTU      int
	Duration time.Duration // 0: infinite
}

// Reply builds the server's answer to req from the lease, or returns nil when req needs none
// (release, decline, or a request that is not a DHCP request). server is the server identifier.
func Reply(req *Message, l Lease, server netip.Addr) *Message {
	if req.Op != 1 {
		return nil
	}
	var typ uint8
	switch req.Type() {
	case Discover:
		typ = Offer
	case Request:
		typ = Ack
		if want, ok := req.Addr(OptRequestedIP); ok && want != l.IP.Addr() {
			typ = Nak
		} else if !ok && req.CIAddr.IsValid() && !req.CIAddr.IsUnspecified() && req.CIAddr != l.IP.Addr() {
			typ = Nak
		}
		if sid, ok := req.Addr(OptServerID); ok && sid != server {
			return nil // the client chose another server
		}
	case Inform:
		typ = Ack
	default:
		return nil
	}
	r := &Message{Op: 2, XID: req.XID, Flags: req.Flags, GIAddr: req.GIAddr, CHAddr: req.CHAddr, SIAddr: server,
		Options: map[uint8][]byte{OptMessageType: {typ}, OptServerID: server.AsSlice()}}
	if typ == Nak {
		return r
	}
	if req.Type() != Inform {
		r.YIAddr = l.IP.Addr()
		secs := uint32(0xffffffff)
		if l.Duration > 0 {
			secs = uint32(l.Duration / time.Second)
			r.Options[OptRenewalTime] = be32(secs / 2)
			r.Options[OptRebindingTime] = be32(secs / 8 * 7)
		}
		r.Options[OptLeaseTime] = be32(secs)
	}
	mask := netip.PrefixFrom(l.IP.Addr(), l.IP.Bits()).Masked()
	r.Options[OptSubnetMask] = maskBytes(l.IP.Bits())
	r.Options[OptBroadcast] = broadcast(mask).AsSlice()
	if l.Router.IsValid() {
		r.Options[OptRouter] = l.Router.AsSlice()
	}
	var dns []byte
	for _, a := range l.DNS {
		dns = append(dns, a.AsSlice()...)
	}
	if len(dns) > 0 {
		r.Options[OptDNS] = dns
	}
	if l.Domain != "" {
		r.Options[OptDomainName] = []byte(l.Domain)
		r.Options[OptSearch] = encodeSearch([]string{l.Domain})
	}
	if l.Hostname != "" {
		r.Options[OptHostname] = []byte(l.Hostname)
	}
	if l.MTU > 0 {
		r.Options[OptMTU] = binary.BigEndian.AppendUint16(nil, uint16(l.MTU))
	}
	return r
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func maskBytes(bits int) []byte {
	m := uint32(0xffffffff) << (32 - bits)
	if bits == 0 {
		m = 0
	}
	return be32(m)
}

func broadcast(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	v := binary.BigEndian.Uint32(a[:]) | ^(uint32(0xffffffff) << (32 - p.Bits()))
	return netip.AddrFrom4([4]byte(be32(v)))
}

// encodeSearch encodes domain names as RFC 1035 labels without compression (RFC 3397).
func encodeSearch(names []string) []byte {
	var b []byte
	for _, n := range names {
		for _, l := range strings.Split(strings.Trim(n, "."), ".") {
			if l == "" || len(l) > 63 {
				continue
			}
			b = append(b, byte(len(l)))
			b = append(b, l...)
		}
		b = append(b, 0)
	}
	return b
}

// DecodeSearch decodes an RFC 3397 search list (compression pointers are not followed).
func DecodeSearch(b []byte) ([]string, error) {
	var out []string
	var labels []string
	for len(b) > 0 {
		n := int(b[0])
		if n == 0 {
			out = append(out, strings.Join(labels, "."))
			labels = nil
			b = b[1:]
			continue
		}
		if n&0xc0 != 0 || len(b) < 1+n {
			return nil, fmt.Errorf("%w: search list label", ErrMalformed)
		}
		labels = append(labels, string(b[1:1+n]))
		b = b[1+n:]
	}
	if len(labels) > 0 {
		return nil, fmt.Errorf("%w: search list not terminated", ErrMalformed)
	}
	return out, nil
}

// LeaseFrom reads the configuration an Offer or Ack carries.
func LeaseFrom(m *Message) (Lease, error) {
	mask, ok := m.Addr(OptSubnetMask)
	if !ok {
		return Lease{}, fmt.Errorf("dhcp: reply without a subnet mask")
	}
	mv := mask.As4()
	bits := 0
	for v := binary.BigEndian.Uint32(mv[:]); v&0x80000000 != 0; v <<= 1 {
		bits++
	}
	if !m.YIAddr.Is4() || m.YIAddr.IsUnspecified() {
		return Lease{}, fmt.Errorf("dhcp: reply without an address")
	}
	l := Lease{IP: netip.PrefixFrom(m.YIAddr, bits), DNS: m.Addrs(OptDNS)}
	if r := m.Addrs(OptRouter); len(r) > 0 {
		l.Router = r[0]
	}
	if v := m.Options[OptMTU]; len(v) == 2 {
		l.MTU = int(binary.BigEndian.Uint16(v))
	}
	if v, ok := m.Options[OptSearch]; ok {
		if s, err := DecodeSearch(v); err == nil && len(s) > 0 {
			l.Domain = s[0]
		}
	}
	if l.Domain == "" {
		l.Domain = string(m.Options[OptDomainName])
	}
	l.Hostname = string(m.Options[OptHostname])
	if v := m.Options[OptLeaseTime]; len(v) == 4 {
		if s := binary.BigEndian.Uint32(v); s != 0xffffffff {
			l.Duration = time.Duration(s) * time.Second
		}
	}
	return l, nil
}

// ParseFrame returns the DHCP message in an Ethernet frame, if it is a UDP/IPv4 datagram to port
// dstPort. ok is false for any other frame; err is set when it is DHCP but malformed.
func ParseFrame(f []byte, dstPort uint16) (m *Message, ip frame.IPv4, ok bool, err error) {
	if len(f) < frame.EthHeaderLen || frame.Type(f) != frame.TypeIPv4 {
		return nil, ip, false, nil
	}
	ip, p, err := frame.ParseIPv4(f)
	if err != nil || ip.Proto != frame.ProtoUDP || ip.Fragment {
		return nil, ip, false, nil
	}
	u, err := frame.ParseUDP(p)
	if err != nil || u.DstPort != dstPort {
		return nil, ip, false, nil
	}
	m, err = Parse(u.Payload)
	return m, ip, true, err
}
