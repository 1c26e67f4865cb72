package lan

import (
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/virtkit/virtkit/switch/dhcp"
	"github.com/virtkit/virtkit/switch/frame"
)

// input handles one frame a guest sent on port p: it enforces the lease, answers DHCP, hands ICMP
// echo for the outside to the pinger, and switches the rest. f is only valid during the call;
// partial says its L4 checksum is partial (the gateway does not verify checksums; other ports'
// writers complete it for peers that need it). When v is not nil, f is v's memory and input
// owns v: it becomes the packet if the frame goes to the gateway and is released otherwise.
func (s *Switch) input(p *Port, f []byte, partial bool, v *buffer.View) {
	if v != nil {
		defer func() {
			if v != nil {
				v.Release()
			}
		}()
	}
	src, dst := frame.Src(f), frame.Dst(f)
	if src.IsMulticast() || src.IsZero() || src == s.gwMAC {
		p.drop(dSpoofMAC)
		return
	}
	if mac := p.MAC(); mac.IsZero() {
		if !s.claim(p, src) {
			p.drop(dSpoofMAC)
			return
		}
	} else if src != mac {
		p.drop(dSpoofMAC)
		return
	}
	toGateway := dst == s.gwMAC
	switch frame.Type(f) {
	case frame.TypeARP:
		a, err := frame.ParseARP(f)
		if err != nil {
			p.drop(dMalformed)
			return
		}
		if a.SenderMAC != src {
			p.drop(dSpoofMAC)
			return
		}
		if a.SenderIP != p.ip && !a.SenderIP.IsUnspecified() {
			p.drop(dSpoofIP)
			return
		}
		if dst.IsMulticast() {
			if a.Op == frame.ARPRequest && a.TargetIP == s.cfg.Gateway {
				s.link.deliver(f, nil)
				return // only the gateway has that address
			}
			s.flood(p, f, false)
			return
		}
	case frame.TypeIPv4:
		ip, payload, err := frame.ParseIPv4(f)
		if err != nil {
			p.drop(dMalformed)
			return
		}
		isDHCP := false
		if ip.Proto == frame.ProtoUDP && !ip.Fragment {
			if u, err := frame.ParseUDP(payload); err == nil && u.DstPort == dhcp.ServerPort && u.SrcPort == dhcp.ClientPort {
				isDHCP = true
			}
		}
		if ip.Src != p.ip && !(isDHCP && ip.Src.IsUnspecified()) {
			p.drop(dSpoofIP)
			return
		}
		if isDHCP && (toGateway || dst.IsMulticast()) {
			s.serveDHCP(p, f)
			return
		}
		if toGateway && ip.Proto == frame.ProtoICMP && ip.Dst != s.cfg.Gateway {
			s.pingOut(p, ip, payload)
			return
		}
	default:
		p.drop(dEtherType)
		return
	}
	switch {
	case toGateway:
		s.link.deliver(f, v)
		v = nil
	case dst.IsMulticast():
		s.flood(p, f, partial)
	default:
		q := (*s.macs.Load())[dst]
		if q == p {
			p.drop(dNoDest)
			return
		}
		if q != nil {
			q.enqueue(copyFrame(f, partial), false)
			return
		}
		// Unknown unicast: like a real switch, flood it, but only to ports whose MAC is not known yet.
		if !s.floodUnlearned(p, f, partial) {
			p.drop(dNoDest)
		}
	}
}

// claim learns src as the MAC of a port whose lease left it open, unless another port has it.
func (s *Switch) claim(p *Port, src frame.MAC) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if q, ok := (*s.macs.Load())[src]; ok {
		return q == p
	}
	if !p.setMAC(src) {
		return p.MAC() == src
	}
	s.learnLocked(p, src)
	s.log.Info().Str("port", p.name).Str("mac", src.String()).Msg("port MAC learned")
	return true
}

// copyFrame queues a copy of f, keeping its partial-checksum mark.
func copyFrame(f []byte, partial bool) *pbuf {
	b := copyBuf(f)
	b.partial = partial
	return b
}

// flood sends f to every port but from.
func (s *Switch) flood(from *Port, f []byte, partial bool) {
	s.mu.Lock()
	ports := make([]*Port, 0, len(s.ports))
	for _, q := range s.ports {
		if q != from {
			ports = append(ports, q)
		}
	}
	s.mu.Unlock()
	for _, q := range ports {
		q.enqueue(copyFrame(f, partial), false)
	}
}

func (s *Switch) floodUnlearned(from *Port, f []byte, partial bool) bool {
	s.mu.Lock()
	var ports []*Port
	for _, q := range s.ports {
		if q != from && q.MAC().IsZero() {
			ports = append(ports, q)
		}
	}
	s.mu.Unlock()
	for _, q := range ports {
		q.enqueue(copyFrame(f, partial), false)
	}
	return len(ports) > 0
}

// output sends a frame the gateway built (taking ownership of b).
func (s *Switch) output(b *pbuf) {
	dst := frame.Dst(b.head())
	if dst.IsMulticast() {
		b = b.flatten()
		f := b.b[frame.HeaderLen:]
		s.mu.Lock()
		ports := make([]*Port, 0, len(s.ports))
		for _, q := range s.ports {
			ports = append(ports, q)
		}
		s.mu.Unlock()
		for _, q := range ports {
			q.enqueue(copyFrame(f, b.partial), false)
		}
		putBuf(b)
		return
	}
	if q := (*s.macs.Load())[dst]; q != nil {
		q.enqueue(b, true)
		return
	}
	s.gwDrops.Add(1)
	putBuf(b)
}

// serveDHCP answers a DHCP request from p with p's static lease.
func (s *Switch) serveDHCP(p *Port, f []byte) {
	req, _, ok, err := dhcp.ParseFrame(f, dhcp.ServerPort)
	if !ok || err != nil {
		p.drop(dMalformed)
		return
	}
	if req.CHAddr != p.MAC() {
		p.drop(dSpoofMAC)
		return
	}
	lease := dhcp.Lease{
		IP:       netip.PrefixFrom(p.ip, s.cfg.Subnet.Bits()),
		Router:   s.cfg.Gateway,
		DNS:      []netip.Addr{s.cfg.Gateway},
		Domain:   s.cfg.Domain,
		Hostname: p.name,
		MTU:      s.cfg.MTU,
		Duration: 24 * time.Hour,
	}
	rep := dhcp.Reply(req, lease, s.cfg.Gateway)
	if rep == nil {
		return
	}
	dstIP := rep.YIAddr
	if req.Flags&0x8000 != 0 || rep.Type() == dhcp.Nak || !dstIP.IsValid() || dstIP.IsUnspecified() {
		dstIP = netip.AddrFrom4([4]byte{255, 255, 255, 255})
	}
	out := frame.BuildUDP4(p.MAC(), s.gwMAC,
		netip.AddrPortFrom(s.cfg.Gateway, dhcp.ServerPort), netip.AddrPortFrom(dstIP, dhcp.ClientPort), rep.Marshal())
	s.log.Debug().Str("port", p.name).Uint8("type", rep.Type()).Str("ip", p.ip.String()).Msg("dhcp reply")
	p.enqueue(copyBuf(out), true)
}
