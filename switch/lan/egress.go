package lan

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/virtkit/virtkit/switch/frame"
)

// egressTCP re-originates a guest's TCP connection from the host. The host connection is dialled
// before the guest's handshake completes, so a refused or forbidden destination answers the guest
// with a RST, as a real network would.
func (s *Switch) egressTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst := netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(addrFrom(id.RemoteAddress), id.RemotePort)
	target, ok := s.policy.Load().target(dst)
	if !ok {
		s.policyDrops.Add(1)
		s.log.Debug().Str("src", src.String()).Str("dst", dst.String()).Msg("tcp egress refused by policy")
		r.Complete(true)
		return
	}
	if !s.takeFlow() {
		r.Complete(true)
		return
	}
	defer s.flows.Add(-1)
	d := net.Dialer{Timeout: 15 * time.Second}
	hc, err := d.DialContext(s.ctx, "tcp4", target.String())
	if err != nil {
		s.log.Debug().Str("src", src.String()).Str("dst", dst.String()).Err(err).Msg("tcp egress dial")
		r.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		r.Complete(true)
		hc.Close()
		return
	}
	r.Complete(false)
	gc := gonet.NewTCPConn(&wq, ep)
	s.splice(gc, hc.(*net.TCPConn))
}

// takeFlow reserves one of Config.MaxFlows; the caller releases it with s.flows.Add(-1).
func (s *Switch) takeFlow() bool {
	if s.flows.Add(1) > int64(s.cfg.MaxFlows) {
		s.flows.Add(-1)
		s.flowDrops.Add(1)
		return false
	}
	return true
}

// halfCloser is a stream with a write side that can be shut alone.
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// copyPool holds splice buffers: large, so that a bulk flow costs few syscalls per megabyte.
var copyPool = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// splice copies both ways, propagating half-closes, until both directions end; it owns and closes
// both connections. It is tracked by the switch's WaitGroup and ends when the switch closes.
func (s *Switch) splice(a, b halfCloser) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		a.Close()
		b.Close()
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-s.ctx.Done():
			a.Close()
			b.Close()
		case <-stop:
		}
	}()
	var wg sync.WaitGroup
	wg.Add(2)
	cp := func(dst, src halfCloser) {
		defer wg.Done()
		bp := copyPool.Get().(*[]byte)
		defer copyPool.Put(bp)
		_, err := io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *bp)
		if err != nil && !errors.Is(err, net.ErrClosed) {
			// A reset on one side resets the other.
			a.Close()
			b.Close()
			return
		}
		dst.CloseWrite()
	}
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}

// egressUDP re-originates a guest's UDP flow from a host socket; the flow ends after
// Config.UDPTimeout without traffic in either direction.
func (s *Switch) egressUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dst := netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort)
	target, ok := s.policy.Load().target(dst)
	if !ok {
		s.policyDrops.Add(1)
		return true // swallow silently: no ICMP hint about what is there
	}
	if !s.takeFlow() {
		return true
	}
	hc, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(target))
	if err != nil {
		s.flows.Add(-1)
		return false
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		s.flows.Add(-1)
		hc.Close()
		return false
	}
	gc := gonet.NewUDPConn(&wq, ep)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.flows.Add(-1)
		gc.Close()
		hc.Close()
		return true
	}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer s.flows.Add(-1)
		s.udpFlow(gc, hc)
	}()
	return true
}

func (s *Switch) udpFlow(gc *gonet.UDPConn, hc *net.UDPConn) {
	var last sync.Mutex
	seen := time.Now()
	touch := func() { last.Lock(); seen = time.Now(); last.Unlock() }
	idle := func() bool { last.Lock(); defer last.Unlock(); return time.Since(seen) >= s.cfg.UDPTimeout }
	done := make(chan struct{})
	closeAll := sync.OnceFunc(func() { close(done); gc.Close(); hc.Close() })
	defer closeAll()
	go func() {
		select {
		case <-s.ctx.Done():
			closeAll()
		case <-done:
		}
	}()
	go func() {
		defer closeAll()
		buf := make([]byte, 65535)
		for {
			hc.SetReadDeadline(time.Now().Add(s.cfg.UDPTimeout))
			n, err := hc.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() && !idle() {
					continue
				}
				return
			}
			touch()
			if _, err := gc.Write(buf[:n]); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, 65535)
	for {
		gc.SetReadDeadline(time.Now().Add(s.cfg.UDPTimeout))
		n, err := gc.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && !idle() {
				continue
			}
			return
		}
		touch()
		if _, err := hc.Write(buf[:n]); err != nil && !errors.Is(err, net.ErrClosed) {
			continue // e.g. ECONNREFUSED from an earlier ICMP; UDP carries on
		}
	}
}

// icmpState holds the unprivileged ping sockets, one per guest echo identifier.
type icmpState struct {
	mu     sync.Mutex
	flows  map[icmpKey]*icmpFlow
	warned bool
}

type icmpKey struct {
	guest netip.Addr
	id    uint16
}

type icmpFlow struct {
	conn *icmp.PacketConn
	port *Port
	last time.Time
}

// pingOut sends a guest's ICMP echo request from an unprivileged ping socket (where
// net.ipv4.ping_group_range allows) and relays the replies; everything else ICMP is dropped.
func (s *Switch) pingOut(p *Port, ip frame.IPv4, payload []byte) {
	if ip.Fragment || len(payload) < 8 || payload[0] != 8 || payload[1] != 0 {
		return
	}
	if !s.policy.Load().permit(ip.Dst) {
		p.drop(dPolicy)
		s.policyDrops.Add(1)
		return
	}
	key := icmpKey{p.ip, binary.BigEndian.Uint16(payload[4:6])}
	s.icmp.mu.Lock()
	if s.icmp.flows == nil {
		s.icmp.flows = map[icmpKey]*icmpFlow{}
	}
	fl := s.icmp.flows[key]
	if fl == nil {
		c, err := icmp.ListenPacket("udp4", "0.0.0.0")
		if err != nil {
			if !s.icmp.warned {
				s.icmp.warned = true
				s.log.Warn().Err(err).Msg("icmp echo egress unavailable: unprivileged ping sockets are not allowed (net.ipv4.ping_group_range)")
			}
			s.icmp.mu.Unlock()
			return
		}
		fl = &icmpFlow{conn: c, port: p}
		s.icmp.flows[key] = fl
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			delete(s.icmp.flows, key)
			s.icmp.mu.Unlock()
			c.Close()
			return
		}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.pingReplies(key, fl)
	}
	fl.last = time.Now()
	s.icmp.mu.Unlock()
	msg := append([]byte(nil), payload...)
	msg[2], msg[3] = 0, 0 // the kernel fixes identifier and checksum
	fl.conn.WriteTo(msg, &net.UDPAddr{IP: ip.Dst.AsSlice()})
}

func (s *Switch) pingReplies(key icmpKey, fl *icmpFlow) {
	defer s.wg.Done()
	defer func() {
		s.icmp.mu.Lock()
		delete(s.icmp.flows, key)
		s.icmp.mu.Unlock()
		fl.conn.Close()
	}()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-s.ctx.Done():
			fl.conn.Close()
		case <-stop:
		}
	}()
	buf := make([]byte, 65535)
	for {
		fl.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		n, from, err := fl.conn.ReadFrom(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				s.icmp.mu.Lock()
				idle := time.Since(fl.last) > 30*time.Second
				s.icmp.mu.Unlock()
				if !idle {
					continue
				}
			}
			return
		}
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
			continue
		}
		ua, ok := from.(*net.UDPAddr)
		if !ok {
			continue
		}
		src, _ := netip.AddrFromSlice(ua.IP)
		reply := append([]byte(nil), buf[:n]...)
		binary.BigEndian.PutUint16(reply[4:6], key.id)
		reply[2], reply[3] = 0, 0
		binary.BigEndian.PutUint16(reply[2:4], frame.Checksum(reply))
		f := frame.BuildIPv4(fl.port.MAC(), s.gwMAC, src.Unmap(), key.guest, frame.ProtoICMP, reply)
		fl.port.enqueue(copyBuf(f), false)
	}
}
