package lan

import (
	"net"
	"net/netip"
)

// policy decides which destinations guests may reach through the gateway.
type policy struct {
	gateway   netip.Addr
	subnet    netip.Prefix
	allowLoop bool
	allow     []netip.Prefix
	deny      []netip.Prefix
	hostAddrs map[netip.Addr]bool // the host's own addresses: reaching them is reaching the host
}

var (
	loopback4 = netip.MustParsePrefix("127.0.0.0/8")
	linkLocal = netip.MustParsePrefix("169.254.0.0/16")
	thisNet   = netip.MustParsePrefix("0.0.0.0/8")
	multicast = netip.MustParsePrefix("224.0.0.0/3") // multicast and reserved, broadcast included
)

func newPolicy(cfg Config) *policy {
	p := &policy{gateway: cfg.Gateway, subnet: cfg.Subnet, allowLoop: cfg.AllowHostLoopback,
		allow: cfg.Allow, deny: cfg.Deny, hostAddrs: map[netip.Addr]bool{}}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok {
					p.hostAddrs[ip.Unmap()] = true
				}
			}
		}
	}
	return p
}

// permit reports whether guests may reach a (other than through the gateway address itself).
func (p *policy) permit(a netip.Addr) bool {
	a = a.Unmap()
	for _, pr := range p.allow {
		if pr.Contains(a) {
			return true
		}
	}
	for _, pr := range p.deny {
		if pr.Contains(a) {
			return false
		}
	}
	if !a.Is4() {
		return false // the LAN is IPv4 only; the host dials IPv4 only
	}
	switch {
	case loopback4.Contains(a) || p.hostAddrs[a]:
		return p.allowLoop
	case linkLocal.Contains(a), thisNet.Contains(a), multicast.Contains(a), p.subnet.Contains(a):
		return false
	}
	return true
}

// target maps a destination a guest asked for to the host address to dial: the gateway address
// means the host's loopback.
func (p *policy) target(dst netip.AddrPort) (netip.AddrPort, bool) {
	if dst.Addr() == p.gateway {
		lo := netip.AddrFrom4([4]byte{127, 0, 0, 1})
		return netip.AddrPortFrom(lo, dst.Port()), p.permit(lo)
	}
	return dst, p.permit(dst.Addr())
}
