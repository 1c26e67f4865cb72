package lan

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
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
	gc := &guestConn{TCPConn: gonet.NewTCPConn(&wq, ep), ep: ep, wq: &wq}
	s.splice(gc, hc.(*net.TCPConn))
}

// guestConn is a guest's TCP connection at the gateway with its endpoint at hand, so that what
// the guest sends can go to the host socket without an intermediate copy (see toHost).
type guestConn struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
	wq *waiter.Queue
}

// errHostBusy stops an endpoint read when the host socket is full.
var errHostBusy = errors.New("host socket full")

// hostWriter writes the netstack's views straight to a host socket, never blocking: when the
// socket is full, the rest of the current view is kept in pending (at most one view, up to
// 64 KiB) and the read stops there; the unread segments stay in the netstack, whose receive
// window then closes on the guest as a real peer's would.
type hostWriter struct {
	rc      syscall.RawConn
	pending []byte
	err     error
}

func (w *hostWriter) Write(p []byte) (int, error) {
	done := 0
	for len(p) > 0 {
		var n int
		var err error
		if rerr := w.rc.Write(func(fd uintptr) bool {
			n, err = unix.Write(int(fd), p)
			return true
		}); rerr != nil {
			err = rerr
		}
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			w.pending = append(w.pending[:0], p...)
			return done + len(p), errHostBusy
		case err != nil:
			w.err = err
			return done, err
		}
		done += n
		p = p[n:]
	}
	return done, nil
}

// toHost copies what the guest sends on c to the host socket hc until the guest's side ends
// (io.EOF-like nil) or either side fails. gonet's Read would copy every byte into a buffer
// first; here the netstack's views are written to the socket as they are.
func (c *guestConn) toHost(hc *net.TCPConn) error {
	rc, err := hc.SyscallConn()
	if err != nil {
		return err
	}
	we, notify := waiter.NewChannelEntry(waiter.ReadableEvents)
	c.wq.EventRegister(&we)
	defer c.wq.EventUnregister(&we)
	w := &hostWriter{rc: rc}
	for {
		res, terr := c.ep.Read(w, tcpip.ReadOptions{})
		if res.Count > 0 {
			c.ep.ModerateRecvBuf(res.Count)
		}
		if w.err != nil {
			return w.err
		}
		if len(w.pending) > 0 {
			// The socket was full: block on it the ordinary way with the one view kept.
			if _, err := hc.Write(w.pending); err != nil {
				return err
			}
			w.pending = w.pending[:0]
			continue
		}
		switch terr.(type) {
		case nil:
		case *tcpip.ErrWouldBlock:
			<-notify
		case *tcpip.ErrClosedForReceive:
			return nil
		default:
			return errors.New(terr.String())
		}
	}
}

// hostReader is the netstack's source for what a host socket received (a tcpip.Payloader):
// the endpoint reads it straight into its own buffers, n bytes that are known to be there.
type hostReader struct {
	rc  syscall.RawConn
	n   int
	err error
}

func (r *hostReader) Len() int { return r.n }

func (r *hostReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if r.n == 0 {
		return 0, io.EOF // all that was announced has been read (a gVisor view reads until EOF)
	}
	var n int
	var err error
	if rerr := r.rc.Read(func(fd uintptr) bool {
		for {
			n, err = unix.Read(int(fd), p[:min(len(p), r.n)])
			if err != unix.EINTR {
				return true
			}
		}
	}); rerr != nil {
		err = rerr
	}
	switch {
	case err == unix.EAGAIN || (err == nil && n == 0):
		r.n = 0 // less than announced (or the end): stop this write here
		return 0, io.EOF
	case err != nil:
		r.err = err
		return 0, err
	}
	r.n -= n
	return n, nil
}

// readable waits until the host socket has data and says how much; 0 means the host closed
// its side.
func readable(rc syscall.RawConn) (int, error) {
	var (
		n    int
		rerr error
	)
	err := rc.Read(func(fd uintptr) bool {
		n, rerr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		if rerr != nil || n > 0 {
			return true
		}
		var b [1]byte
		m, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EAGAIN:
			return false // nothing yet: wait in the poller
		case err != nil:
			rerr = err
		default:
			n = m // 0 at the end of the stream; data that came just now otherwise
		}
		return true
	})
	if err == nil {
		err = rerr
	}
	return n, err
}

// fromHost copies what the host sends on hc to the guest until the host's side ends (nil) or
// either side fails. gonet's Write would take the bytes from a buffer the host socket was read
// into first; here the netstack reads the socket into its own buffers.
func (c *guestConn) fromHost(hc *net.TCPConn) error {
	rc, err := hc.SyscallConn()
	if err != nil {
		return err
	}
	we, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	c.wq.EventRegister(&we)
	defer c.wq.EventUnregister(&we)
	for {
		avail, err := readable(rc)
		if err != nil {
			return err
		}
		if avail == 0 {
			return nil
		}
		r := &hostReader{rc: rc, n: avail}
		for r.n > 0 {
			_, terr := c.ep.Write(r, tcpip.WriteOptions{})
			if r.err != nil {
				return r.err
			}
			switch terr.(type) {
			case nil:
			case *tcpip.ErrWouldBlock:
				<-notify // the guest's window or our send buffer is full
			default:
				return errors.New(terr.String())
			}
		}
	}
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
		var err error
		g, fromGuest := src.(*guestConn)
		h, toHostTCP := dst.(*net.TCPConn)
		hs, fromHostTCP := src.(*net.TCPConn)
		gd, toGuest := dst.(*guestConn)
		switch {
		case fromGuest && toHostTCP:
			err = g.toHost(h)
		case fromHostTCP && toGuest:
			err = gd.fromHost(hs)
		default:
			bp := copyPool.Get().(*[]byte)
			defer copyPool.Put(bp)
			_, err = io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *bp)
		}
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
