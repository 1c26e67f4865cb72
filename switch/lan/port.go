package lan

import (
	"errors"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/virtkit/virtkit/switch/frame"
)

// Drop reasons, as they appear in PortCounters.Drops and the metrics.
const (
	DropSpoofMAC   = "spoof-mac"      // source MAC is not the port's
	DropSpoofIP    = "spoof-ip"       // source IPv4/ARP sender is not the port's lease
	DropEtherType  = "ethertype"      // neither IPv4 nor ARP
	DropMalformed  = "malformed"      // truncated or inconsistent headers
	DropQueueFull  = "queue-full"     // the receiving port's queue was full
	DropNoDest     = "no-destination" // unicast to a MAC nobody has
	DropBadLength  = "bad-length"     // length prefix out of range: the connection is closed
	DropPolicy     = "policy"         // destination forbidden by policy
	DropDisconnect = "disconnected"   // sent to a port whose guest is not connected
)

var dropNames = [...]string{DropSpoofMAC, DropSpoofIP, DropEtherType, DropMalformed, DropQueueFull, DropNoDest, DropBadLength, DropPolicy, DropDisconnect}

type dropReason int

const (
	dSpoofMAC dropReason = iota
	dSpoofIP
	dEtherType
	dMalformed
	dQueueFull
	dNoDest
	dBadLength
	dPolicy
	dDisconnect
	numDrops
)

type counters struct {
	rxFrames, rxBytes, txFrames, txBytes atomic.Uint64
	drops                                [numDrops]atomic.Uint64
	connects                             atomic.Uint64
	rxPartial, txPartial, txCompleted    atomic.Uint64
}

// PortCounters is a snapshot of one port. Rx is from the guest into the switch, Tx from the switch
// to the guest.
type PortCounters struct {
	Name      string
	MAC       string
	IP        netip.Addr
	Connected bool
	Connects  uint64
	RxFrames  uint64
	RxBytes   uint64
	TxFrames  uint64
	TxBytes   uint64
	Drops     map[string]uint64 // by reason; only non-zero reasons
	// Checksum offload (frame.FlagPartial): frames received and sent with partial checksums,
	// and partial frames whose checksum the switch completed because this port's peer did not
	// negotiate partial checksums.
	RxPartial, TxPartial, TxCompleted uint64
}

func (c *counters) snapshot() PortCounters {
	pc := PortCounters{
		RxFrames: c.rxFrames.Load(), RxBytes: c.rxBytes.Load(),
		TxFrames: c.txFrames.Load(), TxBytes: c.txBytes.Load(),
		Connects: c.connects.Load(), Drops: map[string]uint64{},
		RxPartial: c.rxPartial.Load(), TxPartial: c.txPartial.Load(), TxCompleted: c.txCompleted.Load(),
	}
	for i := range c.drops {
		if v := c.drops[i].Load(); v != 0 {
			pc.Drops[dropNames[i]] = v
		}
	}
	return pc
}

func sortCounters(cs []PortCounters) {
	sort.Slice(cs, func(i, j int) bool { return cs[i].Name < cs[j].Name })
}

// pbuf is a queued frame: its length prefix and the frame in b, or, for the gateway's large
// frames, only the prefix in b and the frame in iov: the netstack's own views of pkt, held by a
// reference until written (no copy). partial marks an IPv4 TCP/UDP frame whose checksum is left
// partial (frame.FlagPartial); the port's writer completes it unless its peer negotiated partial
// checksums.
type pbuf struct {
	b       []byte
	partial bool
	pkt     *stack.PacketBuffer
	iov     [][]byte
}

// head returns the start of the frame (at least its Ethernet header).
func (p *pbuf) head() []byte {
	if p.pkt != nil {
		return p.iov[0]
	}
	return p.b[frame.HeaderLen:]
}

// size is the frame's length.
func (p *pbuf) size() int {
	if p.pkt != nil {
		return p.pkt.Size()
	}
	return len(p.b) - frame.HeaderLen
}

// flatten returns p with the frame copied into one buffer (releasing p if it was not already).
func (p *pbuf) flatten() *pbuf {
	if p.pkt == nil {
		return p
	}
	q := getBuf(p.size())
	off := frame.HeaderLen
	for _, sl := range p.iov {
		off += copy(q.b[off:], sl)
	}
	q.partial = p.partial
	putBuf(p)
	return q
}

// pktBuf queues pkt's views as one frame without copying them; the caller must hand over a
// reference (pkt.IncRef).
func pktBuf(pkt *stack.PacketBuffer) *pbuf {
	p := smallPool.Get().(*pbuf)
	p.b = p.b[:frame.HeaderLen]
	frame.PutHeader(p.b, pkt.Size())
	p.partial = pkt.GSOOptions.NeedsCsum
	p.pkt, p.iov = pkt, pkt.AsSlices()
	return p
}

const smallBuf = 2048

var (
	smallPool = sync.Pool{New: func() any { return &pbuf{b: make([]byte, 0, smallBuf)} }}
	bigPool   = sync.Pool{New: func() any { return &pbuf{b: make([]byte, 0, frame.HeaderLen+frame.MaxLen)} }}
)

// getBuf returns a buffer for an n-byte frame, its prefix filled in; the frame goes in b[4:].
func getBuf(n int) *pbuf {
	var p *pbuf
	if n+frame.HeaderLen <= smallBuf {
		p = smallPool.Get().(*pbuf)
	} else {
		p = bigPool.Get().(*pbuf)
	}
	p.b = p.b[:frame.HeaderLen+n]
	p.partial = false
	frame.PutHeader(p.b, n)
	return p
}

func copyBuf(f []byte) *pbuf {
	p := getBuf(len(f))
	copy(p.b[frame.HeaderLen:], f)
	return p
}

func putBuf(p *pbuf) {
	if p.pkt != nil {
		p.pkt.DecRef()
		p.pkt, p.iov = nil, nil
	}
	if cap(p.b) <= smallBuf {
		smallPool.Put(p)
	} else {
		bigPool.Put(p)
	}
}

// Port is one switch port: a lease and, while a guest is connected, its stream connection.
type Port struct {
	sw        *Switch
	name      string
	ip        netip.Addr
	ephemeral bool // removed when its connection ends (AddPort)

	mac atomic.Uint64 // 1<<63 | MAC once known

	out       chan *pbuf
	ctr       counters
	connected atomic.Bool // a guest connection is attached

	mu     sync.Mutex
	conn   net.Conn
	stop   chan struct{} // closed when conn is replaced or the port closes
	closed bool
	done   chan struct{} // closed when the port is removed
}

func newPort(s *Switch, name string, mac frame.MAC, ip netip.Addr) *Port {
	p := &Port{sw: s, name: name, ip: ip, out: make(chan *pbuf, s.cfg.QueueLen), done: make(chan struct{})}
	if !mac.IsZero() {
		p.setMAC(mac)
	}
	return p
}

// Name returns the port's name.
func (p *Port) Name() string { return p.name }

// IP returns the port's leased address.
func (p *Port) IP() netip.Addr { return p.ip }

// MAC returns the port's MAC, zero until learned.
func (p *Port) MAC() frame.MAC {
	v := p.mac.Load()
	if v == 0 {
		return frame.MAC{}
	}
	var m frame.MAC
	for i := 5; i >= 0; i-- {
		m[i] = byte(v)
		v >>= 8
	}
	return m
}

func (p *Port) setMAC(m frame.MAC) bool {
	var v uint64
	for _, b := range m {
		v = v<<8 | uint64(b)
	}
	return p.mac.CompareAndSwap(0, 1<<63|v)
}

// Done is closed when the port has been removed.
func (p *Port) Done() <-chan struct{} { return p.done }

// Counters returns a snapshot of the port's counters.
func (p *Port) Counters() PortCounters {
	c := p.ctr.snapshot()
	c.Name, c.IP = p.name, p.ip
	if m := p.MAC(); !m.IsZero() {
		c.MAC = m.String()
	}
	p.mu.Lock()
	c.Connected = p.conn != nil
	p.mu.Unlock()
	return c
}

func (p *Port) drop(r dropReason) { p.ctr.drops[r].Add(1) }

// attach makes c the port's connection, replacing (and closing) any previous one.
func (p *Port) attach(c net.Conn) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		c.Close()
		return
	}
	if p.conn != nil {
		p.conn.Close()
		close(p.stop)
	}
	stop := make(chan struct{})
	p.conn, p.stop = c, stop
	p.connected.Store(true)
	p.sw.wg.Add(2)
	p.mu.Unlock()
	p.ctr.connects.Add(1)
	p.sw.log.Debug().Str("port", p.name).Msg("port connected")
	lk := &link{c: c}
	go p.writeLoop(lk, stop)
	go p.readLoop(lk)
}

// detach forgets c if it is still the port's connection.
func (p *Port) detach(c net.Conn) {
	p.mu.Lock()
	if p.conn == c {
		p.conn = nil
		p.connected.Store(false)
		close(p.stop)
	}
	p.mu.Unlock()
	c.Close()
	if p.ephemeral {
		p.sw.RemovePort(p.name)
	}
}

func (p *Port) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.connected.Store(false)
	close(p.done)
	if p.conn != nil {
		p.conn.Close()
		close(p.stop)
		p.conn = nil
	}
	p.mu.Unlock()
}

// link is one connection of a port and what its peer negotiated.
type link struct {
	c       net.Conn
	partial atomic.Bool // the peer sent frame.Hello and was answered: FlagPartial goes both ways
}

func (p *Port) readLoop(lk *link) {
	c := lk.c
	defer p.sw.wg.Done()
	defer p.detach(c)
	r := frame.NewReader(c, 0)
	// Large frames (TCP super-segments from offloading relays) are read straight into a
	// netstack buffer: when they go to the gateway, that buffer becomes the packet, with no
	// copy in user space.
	var view *buffer.View
	r.SetAlloc(zeroCopyMin+1, func(n int) []byte {
		if n > buffer.MaxChunkSize {
			return nil // would be a plain heap allocation; the copy path is as good
		}
		view = buffer.NewViewSize(n)
		return view.AsSlice()
	})
	for {
		f, err := r.Next()
		var v *buffer.View
		if r.Allocated() {
			v, view = view, nil
		}
		if err != nil {
			var le *frame.LengthError
			if errors.As(err, &le) {
				p.drop(dBadLength)
				p.sw.log.Warn().Str("port", p.name).Err(err).Msg("closing port connection: bad frame length")
			}
			return
		}
		p.ctr.rxFrames.Add(1)
		p.ctr.rxBytes.Add(uint64(len(f)))
		if frame.Type(f) == frame.TypeControl {
			// Negotiation between relay and switch, never forwarded. A virtkit relay sends
			// Hello first; the switch accepts partial checksums unless offload is off.
			if frame.IsHello(f) && !p.sw.cfg.NoOffload && !lk.partial.Load() {
				r.AcceptPartial()
				lk.partial.Store(true)
				p.enqueue(copyBuf(frame.HelloAck(frame.Src(f), p.sw.gwMAC)), false)
			}
			if v != nil {
				v.Release()
			}
			continue
		}
		if r.Partial() {
			p.ctr.rxPartial.Add(1)
		}
		p.sw.input(p, f, r.Partial(), v)
	}
}

// writeLoop sends queued frames, batching whatever is queued into one writev.
func (p *Port) writeLoop(lk *link, stop chan struct{}) {
	c := lk.c
	defer p.sw.wg.Done()
	batch := make([]*pbuf, 0, 64)
	var bufs net.Buffers
	for {
		var first *pbuf
		select {
		case first = <-p.out:
		case <-stop:
			return
		}
		batch = append(batch[:0], first)
	more:
		for len(batch) < cap(batch) {
			select {
			case b := <-p.out:
				batch = append(batch, b)
			default:
				break more
			}
		}
		bufs = bufs[:0]
		var n uint64
		partialOK := lk.partial.Load()
		for i, b := range batch {
			if b.partial {
				if partialOK {
					frame.SetPartial(b.b)
					p.ctr.txPartial.Add(1)
				} else {
					// The netstack's views are shared: complete the checksum in a copy.
					b = b.flatten()
					batch[i] = b
					frame.FixChecksum(b.b[frame.HeaderLen:])
					p.ctr.txCompleted.Add(1)
				}
			}
			bufs = append(bufs, b.b)
			bufs = append(bufs, b.iov...)
			n += uint64(b.size())
		}
		_, err := bufs.WriteTo(c)
		for _, b := range batch {
			putBuf(b)
		}
		if err != nil {
			c.Close() // the reader notices and detaches
			return
		}
		p.ctr.txFrames.Add(uint64(len(batch)))
		p.ctr.txBytes.Add(n)
	}
}

// enqueue queues b for the guest, taking ownership. With wait it blocks briefly for room (the
// gateway's TCP senders are better slowed than dropped); without it a full queue drops.
func (p *Port) enqueue(b *pbuf, wait bool) {
	if !p.connected.Load() {
		// Like an unplugged cable: nothing is queued for a guest that is not there.
		p.drop(dDisconnect)
		putBuf(b)
		return
	}
	select {
	case p.out <- b:
		return
	default:
	}
	if wait {
		t := time.NewTimer(200 * time.Millisecond)
		defer t.Stop()
		select {
		case p.out <- b:
			return
		case <-t.C:
		case <-p.done:
		}
	}
	p.drop(dQueueFull)
	putBuf(b)
}
