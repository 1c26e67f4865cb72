package dhcp

import (
	"net/netip"

	"github.com/virtkit/virtkit/switch/frame"
)

// params is the parameter request list a client sends.
var params = []byte{OptSubnetMask, OptRouter, OptDNS, OptHostname, OptDomainName, OptMTU, OptBroadcast, OptSearch}

// NewDiscover returns a client's DHCPDISCOVER.
func NewDiscover(mac frame.MAC, xid uint32, hostname string) *Message {
	m := &Message{Op: 1, XID: xid, CHAddr: mac, Options: map[uint8][]byte{
		OptMessageType:  {Discover},
		OptParamRequest: params,
		OptClientID:     append([]byte{1}, mac[:]...),
	}}
	if hostname != "" {
		m.Options[OptHostname] = []byte(hostname)
	}
	return m
}

// NewRequest returns the DHCPREQUEST that accepts offer.
func NewRequest(offer *Message, mac frame.MAC, hostname string) *Message {
	m := &Message{Op: 1, XID: offer.XID, CHAddr: mac, Options: map[uint8][]byte{
		OptMessageType:  {Request},
		OptParamRequest: params,
		OptClientID:     append([]byte{1}, mac[:]...),
		OptRequestedIP:  offer.YIAddr.AsSlice(),
	}}
	if sid, ok := offer.Addr(OptServerID); ok {
		m.Options[OptServerID] = sid.AsSlice()
	}
	if hostname != "" {
		m.Options[OptHostname] = []byte(hostname)
	}
	return m
}

// ClientFrame wraps a client message in the broadcast Ethernet/IPv4/UDP frame a client without an
// address sends.
func ClientFrame(m *Message) []byte {
	return frame.BuildUDP4(frame.Broadcast, m.CHAddr,
		netip.AddrPortFrom(netip.IPv4Unspecified(), ClientPort),
		netip.AddrPortFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), ServerPort), m.Marshal())
}
