package vsock

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/virtkit/virtkit/vhostuser/vhostusertest"
)

// guest is a small virtio-vsock driver stack on the test frontend: it plays the guest kernel so
// the backend can be driven without a VM. One goroutine owns both virtqueues.
type guest struct {
	t      testing.TB
	f      *vhostusertest.Frontend
	rx, tx *vhostusertest.VQ
	cid    uint64

	txCh chan packet
	stop chan struct{}
	done chan struct{}

	mu        sync.Mutex
	listeners map[uint32]chan *gconn
	conns     map[connKey]*gconn // key: local = guest port, peer = host port
	nextPort  uint32
	rsts      int // RSTs received for unknown connections
	// raw, when set, receives every packet instead of the stack (hostile tests).
	raw chan packet
	// replies are the stack's own answers (RESPONSE, RST, CREDIT_UPDATE), sent before anything
	// the applications queued later, as a kernel would.
	replies []packet
}

type packet struct {
	h    header
	data []byte
}

const (
	guestBufAlloc = 1 << 20
	rxBufSize     = 4096
	txSlot        = hdrSize + 64<<10
	txSlots       = 32
)

// gconn is one guest socket.
type gconn struct {
	g          *guest
	key        connKey
	cond       *sync.Cond // uses g.mu
	in         []byte
	peerShut   uint32
	reset      bool
	est        bool
	fwdCnt     uint32 // bytes the app read
	reported   uint32
	txCnt      uint32
	peerAlloc  uint32
	peerFwd    uint32
	closedSelf bool
}

func newGuest(t testing.TB, f *vhostusertest.Frontend, cid uint64) *guest {
	g := &guest{
		t: t, f: f, rx: f.Queues[rxQueue], tx: f.Queues[txQueue], cid: cid,
		txCh: make(chan packet, 256), stop: make(chan struct{}), done: make(chan struct{}),
		listeners: map[uint32]chan *gconn{}, conns: map[connKey]*gconn{}, nextPort: 40000,
	}
	go g.loop()
	t.Cleanup(g.close)
	return g
}

func (g *guest) close() {
	select {
	case <-g.stop:
	default:
		close(g.stop)
	}
	<-g.done
}

func (g *guest) loop() {
	defer close(g.done)
	// RX buffers: header + 4 KiB, as Linux posts them.
	rxBase := g.f.Alloc(uint64(g.rx.Size)*(hdrSize+rxBufSize), 4096)
	slotOf := map[uint16]uint64{}
	post := func(addr uint64) {
		head, ok := g.rx.Add([]vhostusertest.Buf{{Addr: addr, Len: hdrSize, Write: true}, {Addr: addr + hdrSize, Len: rxBufSize, Write: true}})
		if !ok {
			panic("rx ring full")
		}
		slotOf[head] = addr
	}
	for i := 0; i < int(g.rx.Size)/2; i++ {
		post(rxBase + uint64(i)*(hdrSize+rxBufSize))
	}
	g.rx.Kick()
	txBase := g.f.Alloc(txSlots*txSlot, 4096)
	var freeTx []uint64
	for i := 0; i < txSlots; i++ {
		freeTx = append(freeTx, txBase+uint64(i)*txSlot)
	}
	txSlotOf := map[uint16]uint64{}
	var backlog []packet
	for {
		select {
		case <-g.stop:
			return
		default:
		}
		for _, u := range g.tx.Reap() {
			a, ok := txSlotOf[u.Head]
			if !ok {
				panic(fmt.Sprintf("tx completion for unknown head %d", u.Head))
			}
			freeTx = append(freeTx, a)
			delete(txSlotOf, u.Head)
		}
	fill:
		for len(freeTx) > 0 {
			var p packet
			g.mu.Lock()
			backlog = append(backlog, g.replies...)
			g.replies = nil
			g.mu.Unlock()
			if len(backlog) > 0 {
				p, backlog = backlog[0], backlog[1:]
			} else {
				select {
				case p = <-g.txCh:
				default:
					break fill
				}
			}
			addr := freeTx[len(freeTx)-1]
			freeTx = freeTx[:len(freeTx)-1]
			p.h.Len = uint32(len(p.data))
			p.h.put(g.f.Mem[addr:])
			copy(g.f.Mem[addr+hdrSize:], p.data)
			head, ok := g.tx.Add([]vhostusertest.Buf{{Addr: addr, Len: hdrSize + uint32(len(p.data))}})
			if !ok {
				freeTx = append(freeTx, addr)
				backlog = append([]packet{p}, backlog...)
				break
			}
			txSlotOf[head] = addr
			g.tx.Kick()
		}
		if len(freeTx) == 0 && len(g.txCh) > 0 {
			// keep draining completions
		}
		got := false
		var repost []uint64
		for _, u := range g.rx.Reap() {
			got = true
			addr, ok := slotOf[u.Head]
			if !ok {
				panic(fmt.Sprintf("rx completion for unknown head %d", u.Head))
			}
			delete(slotOf, u.Head)
			if u.Len >= hdrSize {
				h, err := parseHeader(g.f.Mem[addr:])
				if err == nil && int(h.Len) <= int(u.Len)-hdrSize {
					data := append([]byte(nil), g.f.Mem[addr+hdrSize:addr+hdrSize+uint64(h.Len)]...)
					g.handle(packet{h: h, data: data})
				}
			}
			repost = append(repost, addr)
		}
		for _, a := range repost {
			post(a)
		}
		if got {
			g.rx.Kick()
		}
		fds := []pollFd{{fd: g.rx.CallFD()}, {fd: g.tx.CallFD()}}
		if len(backlog) == 0 && len(g.txCh) == 0 {
			pollWait(fds, 2)
		}
	}
}

func (g *guest) send(h header, data []byte) {
	h.SrcCID, h.DstCID, h.Type = g.cid, hostCID, typeStream
	select {
	case g.txCh <- packet{h: h, data: data}:
	case <-g.stop:
	}
}

func (g *guest) handle(p packet) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.raw != nil {
		g.raw <- p
		return
	}
	h := p.h
	key := connKey{local: h.DstPort, peer: h.SrcPort}
	c := g.conns[key]
	if c != nil {
		c.peerAlloc, c.peerFwd = h.BufAlloc, h.FwdCnt
		c.cond.Broadcast()
	}
	reply := func(op uint16) {
		hh := header{SrcPort: key.local, DstPort: key.peer, Op: op, BufAlloc: guestBufAlloc}
		if c != nil {
			hh.FwdCnt = c.fwdCnt
			c.reported = c.fwdCnt
		}
		hh.SrcCID, hh.DstCID, hh.Type = g.cid, hostCID, typeStream
		g.replies = append(g.replies, packet{h: hh})
	}
	switch h.Op {
	case opRequest:
		l := g.listeners[h.DstPort]
		if l == nil || c != nil {
			reply(opRST)
			return
		}
		c = g.newConnLocked(key)
		c.peerAlloc, c.peerFwd, c.est = h.BufAlloc, h.FwdCnt, true
		reply(opResponse)
		select {
		case l <- c:
		default:
			g.t.Errorf("guest listener %d backlog full", h.DstPort)
		}
	case opResponse:
		if c == nil {
			reply(opRST)
			return
		}
		c.est = true
	case opRST:
		if c == nil {
			g.rsts++
			return
		}
		c.reset = true
		delete(g.conns, key)
	case opShutdown:
		if c == nil {
			reply(opRST)
			return
		}
		c.peerShut |= h.Flags
		if c.peerShut == shutdownRcv|shutdownSend && c.closedSelf {
			reply(opRST)
			c.reset = true
			delete(g.conns, key)
		}
	case opRW:
		if c == nil {
			reply(opRST)
			return
		}
		c.in = append(c.in, p.data...)
	case opCreditRequest:
		if c != nil {
			reply(opCreditUpdate)
		}
	case opCreditUpdate:
	default:
		g.t.Errorf("guest got unexpected op %s", opName(h.Op))
	}
}

func (g *guest) newConnLocked(key connKey) *gconn {
	c := &gconn{g: g, key: key}
	c.cond = sync.NewCond(&g.mu)
	g.conns[key] = c
	return c
}

// listen registers a guest listener on port.
func (g *guest) listen(port uint32) chan *gconn {
	ch := make(chan *gconn, 128)
	g.mu.Lock()
	g.listeners[port] = ch
	g.mu.Unlock()
	return ch
}

var errReset = errors.New("connection reset")

// dial connects from the guest to host port.
func (g *guest) dial(port uint32) (*gconn, error) {
	g.mu.Lock()
	g.nextPort++
	c := g.newConnLocked(connKey{local: g.nextPort, peer: port})
	g.mu.Unlock()
	g.send(header{SrcPort: c.key.local, DstPort: port, Op: opRequest, BufAlloc: guestBufAlloc}, nil)
	g.mu.Lock()
	defer g.mu.Unlock()
	deadline := time.AfterFunc(10*time.Second, func() { g.mu.Lock(); c.reset = true; c.cond.Broadcast(); g.mu.Unlock() })
	defer deadline.Stop()
	for !c.est && !c.reset {
		c.cond.Wait()
	}
	if c.reset {
		return nil, errReset
	}
	return c, nil
}

func (c *gconn) Read(b []byte) (int, error) {
	g := c.g
	g.mu.Lock()
	for len(c.in) == 0 && !c.reset && c.peerShut&shutdownSend == 0 {
		c.cond.Wait()
	}
	if len(c.in) == 0 {
		g.mu.Unlock()
		if c.peerShut&shutdownSend == 0 {
			return 0, errReset
		}
		return 0, io.EOF
	}
	n := copy(b, c.in)
	c.in = c.in[n:]
	c.fwdCnt += uint32(n)
	var upd *header
	if c.fwdCnt-c.reported >= guestBufAlloc/4 {
		c.reported = c.fwdCnt
		upd = &header{SrcPort: c.key.local, DstPort: c.key.peer, Op: opCreditUpdate, BufAlloc: guestBufAlloc, FwdCnt: c.fwdCnt}
	}
	g.mu.Unlock()
	if upd != nil {
		g.send(*upd, nil)
	}
	return n, nil
}

func (c *gconn) Write(b []byte) (int, error) {
	g := c.g
	done := 0
	for done < len(b) {
		g.mu.Lock()
		var credit uint32
		for !c.reset {
			if infl := c.txCnt - c.peerFwd; infl < c.peerAlloc {
				credit = c.peerAlloc - infl
				break
			}
			c.cond.Wait()
		}
		if c.reset {
			g.mu.Unlock()
			return done, errReset
		}
		n := min(int(credit), len(b)-done, 64<<10)
		c.txCnt += uint32(n)
		c.reported = c.fwdCnt
		h := header{SrcPort: c.key.local, DstPort: c.key.peer, Op: opRW, BufAlloc: guestBufAlloc, FwdCnt: c.fwdCnt}
		g.mu.Unlock()
		g.send(h, append([]byte(nil), b[done:done+n]...))
		done += n
	}
	return done, nil
}

// Close shuts both directions down and waits for the host's RST, as Linux does.
func (c *gconn) Close() error {
	g := c.g
	g.mu.Lock()
	c.closedSelf = true
	h := header{SrcPort: c.key.local, DstPort: c.key.peer, Op: opShutdown, Flags: shutdownRcv | shutdownSend, BufAlloc: guestBufAlloc, FwdCnt: c.fwdCnt}
	g.mu.Unlock()
	g.send(h, nil)
	g.mu.Lock()
	defer g.mu.Unlock()
	t := time.AfterFunc(10*time.Second, func() { g.mu.Lock(); c.cond.Broadcast(); g.mu.Unlock() })
	defer t.Stop()
	start := time.Now()
	for !c.reset && time.Since(start) < 10*time.Second {
		c.cond.Wait()
	}
	if !c.reset {
		return fmt.Errorf("no RST from the host after SHUTDOWN")
	}
	return nil
}

// CloseWrite sends SHUTDOWN(SEND).
func (c *gconn) CloseWrite() {
	g := c.g
	g.mu.Lock()
	h := header{SrcPort: c.key.local, DstPort: c.key.peer, Op: opShutdown, Flags: shutdownSend, BufAlloc: guestBufAlloc, FwdCnt: c.fwdCnt}
	g.mu.Unlock()
	g.send(h, nil)
}

func (c *gconn) isReset() bool {
	c.g.mu.Lock()
	defer c.g.mu.Unlock()
	return c.reset
}
