// Package vsock is a vhost-user virtio-vsock backend that gives the host Cloud Hypervisor's
// hybrid-vsock interface on a unix socket, so that a VMM without its own vsock device (QEMU with
// vhost-user-vsock-device / -pci and no /dev/vhost-vsock) looks exactly like Cloud Hypervisor to
// everything above the VMM driver:
//
//   - host → guest: connect to the UDS, write "CONNECT <port>\n"; once the guest accepts, the
//     backend answers "OK <host port>\n" and the stream is raw; if the guest resets (nobody
//     listens) the backend closes the connection.
//   - guest → host: the guest dials CID 2 port P; the backend connects to the unix socket
//     "<UDS>_<P>" and resets the guest's connection when nobody listens there.
//
// Flow control is virtio-vsock's credit scheme in both directions (buf_alloc/fwd_cnt,
// CREDIT_REQUEST/CREDIT_UPDATE); a guest that overruns the credit the backend granted is reset,
// so host memory per connection stays bounded by Config.BufAlloc. Half-close is carried through
// SHUTDOWN flags and CloseWrite on the unix side.
//
// Concurrency: one goroutine drains the guest's TX queue, one fills the RX queue, and each
// connection has a reader (host → guest) and a writer (guest → host) goroutine. All connection
// state is guarded by Device.mu. Serve's handle owns every goroutine and ends them in Close.
package vsock

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/vhostuser"
)

// Config configures a backend.
type Config struct {
	// Socket is the vhost-user socket the backend listens on; the VMM connects to it
	// (QEMU: -chardev socket,id=c,path=Socket).
	Socket string
	// UDS is the hybrid-vsock socket: hosts connect here, and guest connections to port P go to
	// UDS_P.
	UDS string
	// CID is the guest's context ID (3 or more), reported through the device config space.
	CID uint64
	// BufAlloc is the receive buffer granted to the guest per connection (default 256 KiB).
	BufAlloc uint32
	// MaxConns bounds concurrent connections (default 1023, Cloud Hypervisor's limit).
	MaxConns int
	// ConnectTimeout bounds how long a host CONNECT waits for the guest's answer and how long a
	// guest connection waits for the host listener (default 30 s).
	ConnectTimeout time.Duration
	// Logger receives the backend's logs.
	Logger zerolog.Logger
}

const (
	rxQueue = 0
	txQueue = 1
	// evQueue = 2 stays with the VMM (QEMU handles the event queue itself).
	numQueues = 3

	hostPortBase  = 1 << 30 // host-side ports for host-initiated connections, as Firecracker does
	maxUnknownRST = 256     // bound on queued resets answering packets for unknown connections
	readChunk     = 64 << 10
)

// Backend is a running vhost-user vsock backend.
type Backend struct {
	dev    *Device
	cancel context.CancelFunc
	wg     sync.WaitGroup
	vhost  *net.UnixListener
	uds    *net.UnixListener
	errMu  sync.Mutex
	err    error
}

// Serve starts a backend: it listens on cfg.Socket for the VMM and on cfg.UDS for host
// connections. Stale socket files at both paths are replaced. The backend runs until ctx ends or
// Close is called.
func Serve(ctx context.Context, cfg Config) (*Backend, error) {
	dev, err := NewDevice(cfg)
	if err != nil {
		return nil, err
	}
	vl, err := listenUnix(cfg.Socket)
	if err != nil {
		return nil, fmt.Errorf("vsock: listen on vhost-user socket: %w", err)
	}
	ul, err := listenUnix(cfg.UDS)
	if err != nil {
		vl.Close()
		return nil, fmt.Errorf("vsock: listen on hybrid vsock socket: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	b := &Backend{dev: dev, cancel: cancel, vhost: vl, uds: ul}
	b.wg.Add(2)
	go func() {
		defer b.wg.Done()
		if err := vhostuser.Serve(ctx, vl, dev, cfg.Logger); err != nil {
			b.setErr(err)
			cancel()
		}
	}()
	go func() {
		defer b.wg.Done()
		if err := dev.ServeHost(ctx, ul); err != nil {
			b.setErr(err)
			cancel()
		}
	}()
	return b, nil
}

func (b *Backend) setErr(err error) {
	b.errMu.Lock()
	defer b.errMu.Unlock()
	if b.err == nil {
		b.err = err
	}
}

// Close stops the backend, resets every connection and removes its sockets.
func (b *Backend) Close() error {
	b.cancel()
	return b.Wait()
}

// Wait blocks until the backend has stopped (ctx ended, Close, or a fatal error) and returns
// that error, if any.
func (b *Backend) Wait() error {
	b.wg.Wait()
	b.dev.Reset()
	b.dev.wg.Wait()
	os.Remove(b.dev.cfg.Socket)
	os.Remove(b.dev.cfg.UDS)
	b.errMu.Lock()
	defer b.errMu.Unlock()
	return b.err
}

func listenUnix(path string) (*net.UnixListener, error) { return vhostuser.Listen(path) }

// connKey identifies a connection: the host-side port and the guest-side port.
type connKey struct{ local, peer uint32 }

type connState int

const (
	stateConnecting connState = iota // waiting for the guest's RESPONSE or for the host dial
	stateEstablished
	stateClosed
)

// conn is one stream between a unix socket on the host and a guest vsock socket.
type conn struct {
	key   connKey
	uds   *net.UnixConn
	state connState
	// hostInitiated: the host connected through the UDS and we sent REQUEST.
	hostInitiated bool
	// accepted: the guest answered RESPONSE. handshaking: hostConnect has not written "OK" yet,
	// so a close must leave the unix socket to it (the host still gets OK, then EOF).
	accepted, handshaking bool
	established           chan struct{} // closed when state leaves connecting
	cond                  *sync.Cond    // wakes this conn's reader and writer (uses Device.mu)

	// guest → host
	wbuf      [][]byte // payloads waiting to be written to uds
	wbufLen   uint32
	rxCnt     uint32 // guest bytes received
	fwdCnt    uint32 // guest bytes written to the host socket
	reported  uint32 // fwd_cnt last told to the guest
	guestShut uint32 // SHUTDOWN flags received from the guest

	// host → guest
	pending      []byte // data the reader is handing to the RX queue
	txCnt        uint32 // bytes sent to the guest
	peerBufAlloc uint32
	peerFwdCnt   uint32
	hostEOF      bool

	// control packets waiting for the RX queue
	wantRequest, wantResponse, wantCredit, wantRST bool
	wantShutdown                                   uint32
	inCtrl, inData                                 bool
}

// Device is the virtio-vsock device. It implements vhostuser.Device; ServeHost serves the
// hybrid-vsock side.
type Device struct {
	cfg Config
	log zerolog.Logger
	wg  sync.WaitGroup // connection goroutines

	mu       sync.Mutex
	conns    map[connKey]*conn
	nextPort uint32
	ctrl     []*conn  // conns with control packets to send, FIFO
	data     []*conn  // conns with pending data, FIFO
	unknown  []header // RSTs answering packets for unknown connections
	rxWake   chan struct{}
	rx, tx   *runner
	held     *vhostuser.Chain // an RX chain popped but not yet filled
}

// runner is a goroutine serving one queue.
type runner struct {
	q    *vhostuser.Queue
	stop chan struct{}
	done chan struct{}
}

// NewDevice checks cfg and makes a device; Serve is the usual entry point.
func NewDevice(cfg Config) (*Device, error) {
	if cfg.CID < 3 || cfg.CID > 0xffffffff-1 {
		return nil, fmt.Errorf("vsock: guest CID %d out of range (3..%d)", cfg.CID, uint32(0xffffffff-1))
	}
	if cfg.Socket == "" || cfg.UDS == "" {
		return nil, errors.New("vsock: Config.Socket and Config.UDS are required")
	}
	if cfg.BufAlloc == 0 {
		cfg.BufAlloc = 256 << 10
	}
	if cfg.BufAlloc < 4096 {
		return nil, fmt.Errorf("vsock: BufAlloc %d is below 4096", cfg.BufAlloc)
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = 1023
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 30 * time.Second
	}
	return &Device{
		cfg: cfg, log: cfg.Logger, conns: map[connKey]*conn{}, nextPort: hostPortBase,
		rxWake: make(chan struct{}, 1),
	}, nil
}

// Features implements vhostuser.Device: stream sockets only (no SEQPACKET).
func (d *Device) Features() uint64 { return 0 }

// Queues implements vhostuser.Device: rx, tx and event.
func (d *Device) Queues() int { return numQueues }

// Config implements vhostuser.Device: struct virtio_vsock_config { le64 guest_cid }.
func (d *Device) Config() []byte {
	b := make([]byte, 8)
	for i := range 8 {
		b[i] = byte(d.cfg.CID >> (8 * i))
	}
	return b
}

// Start implements vhostuser.Device.
func (d *Device) Start(q *vhostuser.Queue) {
	r := &runner{q: q, stop: make(chan struct{}), done: make(chan struct{})}
	d.mu.Lock()
	defer d.mu.Unlock()
	switch q.Index {
	case rxQueue:
		d.rx = r
		go d.rxLoop(r)
	case txQueue:
		d.tx = r
		go d.txLoop(r)
	default:
		close(r.done) // the event queue carries only transport resets, which we never send
	}
}

// Stop implements vhostuser.Device.
func (d *Device) Stop(index int) {
	d.mu.Lock()
	var r *runner
	switch index {
	case rxQueue:
		r, d.rx = d.rx, nil
	case txQueue:
		r, d.tx = d.tx, nil
	}
	d.mu.Unlock()
	if r == nil {
		return
	}
	close(r.stop)
	<-r.done
	if index == rxQueue {
		// A buffer popped but never filled goes back empty; the guest drops it and refills.
		d.mu.Lock()
		held := d.held
		d.held = nil
		d.mu.Unlock()
		if held != nil {
			r.q.Done(held.Head, 0)
		}
	}
}

// Reset implements vhostuser.Device: every connection is dropped.
func (d *Device) Reset() {
	d.log.Debug().Msg("vsock: device reset: dropping every connection")
	d.mu.Lock()
	for _, c := range d.conns {
		d.closeLocked(c, false)
	}
	d.ctrl, d.data, d.unknown, d.held = nil, nil, nil, nil
	d.mu.Unlock()
}

// closeLocked ends c. With rst, the guest is told with a RST.
func (d *Device) closeLocked(c *conn, rst bool) {
	if c.state == stateClosed {
		return
	}
	if c.state == stateConnecting {
		close(c.established)
	}
	c.state = stateClosed
	delete(d.conns, c.key)
	if c.uds != nil && !c.handshaking {
		c.uds.Close()
	}
	c.pending, c.wbuf = nil, nil
	c.wantRequest, c.wantResponse, c.wantCredit, c.wantShutdown = false, false, false, 0
	if rst {
		c.wantRST = true
		d.queueCtrlLocked(c)
	}
	c.cond.Broadcast()
}

func (d *Device) queueCtrlLocked(c *conn) {
	if !c.inCtrl {
		c.inCtrl = true
		d.ctrl = append(d.ctrl, c)
	}
	d.wakeRx()
}

func (d *Device) wakeRx() {
	select {
	case d.rxWake <- struct{}{}:
	default:
	}
}

func (d *Device) newConnLocked(key connKey, uds *net.UnixConn, hostInitiated bool) *conn {
	c := &conn{key: key, uds: uds, hostInitiated: hostInitiated, established: make(chan struct{})}
	c.cond = sync.NewCond(&d.mu)
	d.conns[key] = c
	return c
}

// ---- host side ----

// ServeHost accepts host connections on l (the hybrid-vsock socket) until ctx ends.
func (d *Device) ServeHost(ctx context.Context, l *net.UnixListener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		uc, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("vsock: accept on %s: %w", d.cfg.UDS, err)
		}
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			d.hostConnect(ctx, uc)
		}()
	}
}

// hostConnect performs the CONNECT handshake for one host connection and then runs it.
func (d *Device) hostConnect(ctx context.Context, uc *net.UnixConn) {
	uc.SetReadDeadline(time.Now().Add(d.cfg.ConnectTimeout))
	br := bufio.NewReaderSize(uc, 64)
	port, err := readConnect(br)
	if err != nil {
		d.log.Debug().Err(err).Msg("vsock: bad CONNECT from host")
		uc.Close()
		return
	}
	uc.SetReadDeadline(time.Time{})
	early := make([]byte, br.Buffered())
	br.Read(early)

	d.mu.Lock()
	if len(d.conns) >= d.cfg.MaxConns {
		d.mu.Unlock()
		d.log.Warn().Int("max", d.cfg.MaxConns).Msg("vsock: connection limit reached; refusing host connection")
		uc.Close()
		return
	}
	local := d.allocPortLocked(port)
	c := d.newConnLocked(connKey{local: local, peer: port}, uc, true)
	c.handshaking = true
	c.pending = early
	c.wantRequest = true
	d.queueCtrlLocked(c)
	d.mu.Unlock()

	t := time.NewTimer(d.cfg.ConnectTimeout)
	defer t.Stop()
	select {
	case <-c.established:
	case <-t.C:
	case <-ctx.Done():
	}
	d.mu.Lock()
	if !c.accepted {
		d.log.Debug().Uint32("port", port).Msg("vsock: guest refused or ignored host connection")
		c.handshaking = false
		d.closeLocked(c, c.state == stateConnecting)
		d.mu.Unlock()
		uc.Close()
		return
	}
	d.mu.Unlock()
	_, err = fmt.Fprintf(uc, "OK %d\n", local)
	d.mu.Lock()
	c.handshaking = false
	if err != nil || c.state != stateEstablished {
		// The guest accepted and already closed (or the host went away): the host saw OK and
		// now sees EOF.
		d.closeLocked(c, err != nil)
		d.mu.Unlock()
		uc.Close()
		return
	}
	d.mu.Unlock()
	d.run(c)
}

// readConnect reads "CONNECT <port>\n".
func readConnect(br *bufio.Reader) (uint32, error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return 0, fmt.Errorf("read CONNECT line: %w", err)
	}
	return parseConnect(string(line))
}

func parseConnect(line string) (uint32, error) {
	rest, ok := strings.CutPrefix(line, "CONNECT ")
	if !ok {
		return 0, fmt.Errorf("want \"CONNECT <port>\\n\", got %q", line)
	}
	rest = strings.TrimSuffix(strings.TrimSuffix(rest, "\n"), "\r")
	p, err := strconv.ParseUint(rest, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("CONNECT port %q: %w", rest, err)
	}
	return uint32(p), nil
}

func (d *Device) allocPortLocked(peer uint32) uint32 {
	for {
		p := d.nextPort
		d.nextPort++
		if d.nextPort == 0 {
			d.nextPort = hostPortBase
		}
		if _, busy := d.conns[connKey{local: p, peer: peer}]; !busy {
			return p
		}
	}
}

// guestConnect dials UDS_<port> for a guest REQUEST and answers RESPONSE or RST.
func (d *Device) guestConnect(c *conn) {
	path := fmt.Sprintf("%s_%d", d.cfg.UDS, c.key.local)
	dl := net.Dialer{Timeout: d.cfg.ConnectTimeout}
	nc, err := dl.Dial("unix", path)
	d.mu.Lock()
	if err != nil || c.state != stateConnecting {
		if err != nil {
			d.log.Debug().Err(err).Uint32("port", c.key.local).Msg("vsock: no host listener for guest connection")
		}
		if nc != nil {
			nc.Close()
		}
		d.closeLocked(c, c.state == stateConnecting)
		d.mu.Unlock()
		return
	}
	c.uds = nc.(*net.UnixConn)
	c.state = stateEstablished
	close(c.established)
	c.wantResponse = true
	d.queueCtrlLocked(c)
	d.mu.Unlock()
	d.run(c)
}

// run serves an established connection: the writer in a goroutine, the reader here.
func (d *Device) run(c *conn) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.writer(c)
	}()
	d.reader(c)
}

// reader moves host data to the guest within the guest's credit.
func (d *Device) reader(c *conn) {
	buf := make([]byte, readChunk)
	d.mu.Lock()
	if len(c.pending) > 0 { // bytes the host sent right after its CONNECT line
		buf = buf[:copy(buf, c.pending)]
		c.pending = nil
		d.mu.Unlock()
		if !d.handOver(c, buf) {
			return
		}
		buf = buf[:cap(buf)]
		d.mu.Lock()
	}
	d.mu.Unlock()
	for {
		d.mu.Lock()
		for c.state == stateEstablished && c.guestShut&shutdownRcv == 0 && c.credit() == 0 {
			c.cond.Wait()
		}
		if c.state != stateEstablished || c.guestShut&shutdownRcv != 0 {
			d.mu.Unlock()
			return
		}
		n := min(int(c.credit()), len(buf))
		d.mu.Unlock()
		k, err := c.uds.Read(buf[:n])
		if k > 0 && !d.handOver(c, buf[:k]) {
			return
		}
		if err != nil {
			d.mu.Lock()
			if c.state == stateEstablished {
				if errors.Is(err, io.EOF) {
					c.hostEOF = true
					c.wantShutdown |= shutdownSend
					d.queueCtrlLocked(c)
					d.maybeFinishLocked(c)
				} else {
					d.closeLocked(c, true)
				}
			}
			d.mu.Unlock()
			return
		}
	}
}

// handOver queues data for the RX queue and waits until it has all been sent.
func (d *Device) handOver(c *conn, b []byte) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if c.state != stateEstablished {
		return false
	}
	c.pending = b
	if !c.inData {
		c.inData = true
		d.data = append(d.data, c)
	}
	d.wakeRx()
	for c.state == stateEstablished && len(c.pending) > 0 {
		c.cond.Wait()
	}
	return c.state == stateEstablished
}

// credit is how many bytes the guest can take now.
func (c *conn) credit() uint32 {
	inflight := c.txCnt - c.peerFwdCnt
	if inflight >= c.peerBufAlloc {
		return 0
	}
	return c.peerBufAlloc - inflight
}

// writer moves guest data to the host socket and returns credit to the guest.
func (d *Device) writer(c *conn) {
	for {
		d.mu.Lock()
		for c.state == stateEstablished && len(c.wbuf) == 0 && c.guestShut&shutdownSend == 0 {
			c.cond.Wait()
		}
		if c.state != stateEstablished {
			d.mu.Unlock()
			return
		}
		if len(c.wbuf) == 0 { // guest shut its sending side and everything is flushed
			c.uds.CloseWrite()
			d.maybeFinishLocked(c)
			d.mu.Unlock()
			return
		}
		chunk := c.wbuf[0]
		d.mu.Unlock()
		_, err := c.uds.Write(chunk)
		d.mu.Lock()
		if c.state != stateEstablished {
			d.mu.Unlock()
			return
		}
		if err != nil {
			d.closeLocked(c, true)
			d.mu.Unlock()
			return
		}
		c.wbuf[0] = nil
		c.wbuf = c.wbuf[1:]
		c.wbufLen -= uint32(len(chunk))
		c.fwdCnt += uint32(len(chunk))
		// Like Linux: tell the sender about freed space before its view of our buffer runs low.
		if d.cfg.BufAlloc-(c.rxCnt-c.reported) < readChunk || len(c.wbuf) == 0 && c.fwdCnt-c.reported >= d.cfg.BufAlloc/2 {
			if c.fwdCnt != c.reported {
				c.wantCredit = true
				d.queueCtrlLocked(c)
			}
		}
		d.mu.Unlock()
	}
}

// maybeFinishLocked closes a connection whose both directions are shut.
func (d *Device) maybeFinishLocked(c *conn) {
	if c.hostEOF && c.guestShut&shutdownSend != 0 && len(c.wbuf) == 0 && len(c.pending) == 0 {
		// Both directions are done: tell the guest our side is shut (if not yet), then RST.
		shut := c.wantShutdown
		d.closeLocked(c, true)
		c.wantShutdown = shut
	}
}

// ---- TX queue (guest → device) ----

func (d *Device) txLoop(r *runner) {
	defer close(r.done)
	q := r.q
	hdr := make([]byte, hdrSize)
	// drain handles every packet the guest has made available; it reports false once the
	// queue is broken.
	drain := func() bool {
		for {
			ch, err := q.Pop()
			if err != nil {
				d.log.Error().Err(err).Msg("vsock: TX queue stopped")
				return false
			}
			if ch == nil {
				return true
			}
			d.handleTX(ch, hdr)
			q.Push(ch.Head, 0)
		}
	}
	for {
		q.DisableNotify()
		ok := drain()
		q.Notify()
		if !ok {
			<-r.stop
			return
		}
		if q.EnableNotify() {
			continue
		}
		if err := q.WaitKick(); err != nil {
			// The ring is being stopped (a guest powering off, a VMM pausing): packets the guest
			// queued last (its RESPONSE and SHUTDOWN to a final request) still count.
			drain()
			q.Notify()
			<-r.stop
			return
		}
	}
}

// handleTX processes one packet from the guest.
func (d *Device) handleTX(ch *vhostuser.Chain, hb []byte) {
	if vhostuser.Gather(hb, ch.Readable, 0) < hdrSize {
		d.log.Debug().Msg("vsock: TX packet shorter than its header")
		return
	}
	h, err := parseHeader(hb)
	if err != nil {
		d.log.Debug().Err(err).Msg("vsock: bad TX packet")
		return
	}
	if int(h.Len) > ch.ReadableLen()-hdrSize {
		d.log.Debug().Uint32("len", h.Len).Msg("vsock: TX packet payload longer than its buffers")
		return
	}
	if h.SrcCID != d.cfg.CID || h.DstCID != hostCID {
		d.log.Debug().Uint64("src", h.SrcCID).Uint64("dst", h.DstCID).Msg("vsock: TX packet with foreign CIDs dropped")
		return
	}
	d.log.Trace().Str("op", opName(h.Op)).Uint32("src", h.SrcPort).Uint32("dst", h.DstPort).Uint32("len", h.Len).Msg("vsock: guest packet")
	d.mu.Lock()
	defer d.mu.Unlock()
	key := connKey{local: h.DstPort, peer: h.SrcPort}
	c := d.conns[key]
	if h.Type != typeStream {
		if h.Op != opRST {
			d.rstUnknownLocked(h)
		}
		return
	}
	if c == nil {
		switch h.Op {
		case opRequest:
			if len(d.conns) >= d.cfg.MaxConns {
				d.rstUnknownLocked(h)
				return
			}
			c = d.newConnLocked(key, nil, false)
			c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
			d.wg.Add(1)
			go func() {
				defer d.wg.Done()
				d.guestConnect(c)
			}()
		case opRST:
		default:
			d.rstUnknownLocked(h)
		}
		return
	}
	c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
	c.cond.Broadcast() // the reader may have credit now
	switch h.Op {
	case opResponse:
		if c.hostInitiated && c.state == stateConnecting {
			c.state = stateEstablished
			c.accepted = true
			close(c.established)
			return
		}
		d.closeLocked(c, true)
	case opRST:
		d.closeLocked(c, false)
	case opRequest:
		d.closeLocked(c, true) // a second REQUEST on a live connection
	case opShutdown:
		c.guestShut |= h.Flags & (shutdownRcv | shutdownSend)
		if c.guestShut&shutdownRcv != 0 && c.uds != nil {
			c.pending = nil
			c.hostEOF = true
			c.uds.CloseRead()
		}
		d.maybeFinishLocked(c)
	case opRW:
		if c.state != stateEstablished || c.guestShut&shutdownSend != 0 {
			d.closeLocked(c, true)
			return
		}
		if h.Len == 0 {
			return
		}
		if c.rxCnt+h.Len-c.fwdCnt > d.cfg.BufAlloc {
			d.log.Warn().Uint32("port", c.key.local).Msg("vsock: guest overran its credit; resetting the connection")
			d.closeLocked(c, true)
			return
		}
		p := make([]byte, h.Len)
		vhostuser.Gather(p, ch.Readable, hdrSize)
		c.wbuf = append(c.wbuf, p)
		c.wbufLen += h.Len
		c.rxCnt += h.Len
	case opCreditUpdate:
	case opCreditRequest:
		c.wantCredit = true
		d.queueCtrlLocked(c)
	default:
		d.closeLocked(c, true)
	}
}

func (d *Device) rstUnknownLocked(h header) {
	if h.Op == opRST || len(d.unknown) >= maxUnknownRST {
		return
	}
	d.unknown = append(d.unknown, header{
		SrcCID: hostCID, DstCID: d.cfg.CID, SrcPort: h.DstPort, DstPort: h.SrcPort,
		Type: h.Type, Op: opRST,
	})
	d.wakeRx()
}

// ---- RX queue (device → guest) ----

func (d *Device) rxLoop(r *runner) {
	defer close(r.done)
	q := r.q
	kickDone := make(chan struct{})
	go func() { // turns guest kicks (new RX buffers) into wake-ups; ends when the queue closes
		defer close(kickDone)
		for q.WaitKick() == nil {
			d.wakeRx()
		}
	}()
	defer func() {
		select {
		case <-kickDone:
		case <-r.stop:
			<-kickDone
		}
	}()
	for {
		sent := false
		for {
			d.mu.Lock()
			work := len(d.unknown) > 0 || len(d.ctrl) > 0 || len(d.data) > 0
			ch := d.held
			d.held = nil
			d.mu.Unlock()
			if !work {
				d.mu.Lock()
				d.held = ch
				d.mu.Unlock()
				break
			}
			if ch == nil {
				var err error
				ch, err = q.Pop()
				if err != nil {
					d.log.Error().Err(err).Msg("vsock: RX queue stopped")
					<-r.stop
					return
				}
				if ch == nil {
					if q.EnableNotify() {
						continue
					}
					break
				}
			}
			d.mu.Lock()
			n, ok := d.fillLocked(ch)
			if !ok {
				d.held = ch
			}
			d.mu.Unlock()
			if ok {
				q.Push(ch.Head, n)
				sent = true
			}
		}
		if sent {
			q.Notify()
		}
		select {
		case <-r.stop:
			return
		case <-d.rxWake:
		}
	}
}

// fillLocked writes the next packet into ch. It returns false when there was nothing to send.
func (d *Device) fillLocked(ch *vhostuser.Chain) (uint32, bool) {
	capacity := ch.WritableLen()
	if capacity < hdrSize {
		d.log.Warn().Int("bytes", capacity).Msg("vsock: RX buffer smaller than a packet header; returned empty")
		return 0, true
	}
	var hb [hdrSize]byte
	if len(d.unknown) > 0 {
		h := d.unknown[0]
		d.unknown = d.unknown[1:]
		h.put(hb[:])
		return uint32(vhostuser.Scatter(ch.Writable, 0, hb[:])), true
	}
	for len(d.ctrl) > 0 {
		c := d.ctrl[0]
		h, more := d.nextCtrlLocked(c)
		if !more {
			c.inCtrl = false
			d.ctrl = d.ctrl[1:]
		}
		if h == nil {
			continue
		}
		h.put(hb[:])
		return uint32(vhostuser.Scatter(ch.Writable, 0, hb[:])), true
	}
	for len(d.data) > 0 {
		if capacity == hdrSize { // no room for a byte of data: hand the buffer back empty
			return 0, true
		}
		c := d.data[0]
		if c.state != stateEstablished || len(c.pending) == 0 {
			c.inData = false
			d.data = d.data[1:]
			continue
		}
		k := min(len(c.pending), capacity-hdrSize)
		h := d.hdrLocked(c, opRW)
		h.Len = uint32(k)
		h.put(hb[:])
		vhostuser.Scatter(ch.Writable, 0, hb[:])
		vhostuser.Scatter(ch.Writable, hdrSize, c.pending[:k])
		c.pending = c.pending[k:]
		c.txCnt += uint32(k)
		if len(c.pending) == 0 {
			c.inData = false
			d.data = d.data[1:]
			c.cond.Broadcast()
			if c.wantShutdown != 0 {
				d.queueCtrlLocked(c)
			}
			d.maybeFinishLocked(c)
		}
		return uint32(hdrSize + k), true
	}
	return 0, false
}

// hdrLocked builds a header for c carrying our current credit.
func (d *Device) hdrLocked(c *conn, op uint16) *header {
	c.reported = c.fwdCnt
	return &header{
		SrcCID: hostCID, DstCID: d.cfg.CID, SrcPort: c.key.local, DstPort: c.key.peer,
		Type: typeStream, Op: op, BufAlloc: d.cfg.BufAlloc, FwdCnt: c.fwdCnt,
	}
}

// nextCtrlLocked returns c's next control packet (nil if none) and whether more remain.
func (d *Device) nextCtrlLocked(c *conn) (*header, bool) {
	var h *header
	switch {
	case c.wantShutdown != 0 && len(c.pending) == 0:
		h = d.hdrLocked(c, opShutdown)
		h.Flags = c.wantShutdown
		c.wantShutdown = 0
	case c.wantRST:
		c.wantRST = false
		h = d.hdrLocked(c, opRST)
	case c.wantRequest:
		c.wantRequest = false
		h = d.hdrLocked(c, opRequest)
	case c.wantResponse:
		c.wantResponse = false
		h = d.hdrLocked(c, opResponse)
	case c.wantCredit:
		c.wantCredit = false
		h = d.hdrLocked(c, opCreditUpdate)
	}
	more := c.wantRST || c.wantRequest || c.wantResponse || c.wantCredit || (c.wantShutdown != 0 && len(c.pending) == 0)
	return h, more
}
