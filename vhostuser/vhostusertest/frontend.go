// Package vhostusertest is a vhost-user frontend for tests and benchmarks: it plays the VMM and
// the guest driver at once, with guest memory in a memfd shared with the backend and real split
// virtqueues, so backends can be driven without a VM. It also lets tests send raw, malformed
// messages and corrupt rings.
//
// Concurrency: a Frontend's control messages are serialised by its mutex; each VQ is meant to be
// driven by one goroutine at a time.
package vhostusertest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Request codes used by the harness (see the vhost-user specification).
const (
	GetFeatures         = 1
	SetFeatures         = 2
	SetOwner            = 3
	SetMemTable         = 5
	SetVringNum         = 8
	SetVringAddr        = 9
	SetVringBase        = 10
	GetVringBase        = 11
	SetVringKick        = 12
	SetVringCall        = 13
	GetProtocolFeatures = 15
	SetProtocolFeatures = 16
	GetQueueNum         = 17
	SetVringEnable      = 18
	GetConfig           = 24

	FlagNeedReply = 0x8
	ProtoReplyAck = 1 << 3
	ProtoConfig   = 1 << 9
	ProtoMQ       = 1 << 0

	FeatureIndirect = 1 << 28
	FeatureEventIdx = 1 << 29
	FeatureProto    = 1 << 30
	FeatureVersion1 = 1 << 32

	DescNext     = 1
	DescWrite    = 2
	DescIndirect = 4
)

// Frontend is a connected vhost-user frontend with its own guest memory.
type Frontend struct {
	mu   sync.Mutex
	conn *net.UnixConn
	// Mem is the whole guest memory, guest physical address 0 at Mem[0].
	Mem    []byte
	memFD  int
	next   uint64 // bump allocator
	Queues []*VQ
	// Protocol is the negotiated protocol feature set; Features the acked virtio features.
	Protocol, Features uint64
}

// Dial connects to a backend socket and creates memSize bytes of guest memory.
func Dial(socket string, memSize int) (*Frontend, error) {
	// A socket file exists between bind(2) and listen(2): a backend that has just started may
	// refuse for a moment.
	var c *net.UnixConn
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; {
		c, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
		if err == nil || !(errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		return nil, fmt.Errorf("vhostusertest: dial %s: %w", socket, err)
	}
	fd, err := unix.MemfdCreate("vhostusertest-guest", unix.MFD_CLOEXEC)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("vhostusertest: memfd: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(memSize)); err != nil {
		c.Close()
		unix.Close(fd)
		return nil, fmt.Errorf("vhostusertest: size memfd: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, memSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		c.Close()
		unix.Close(fd)
		return nil, fmt.Errorf("vhostusertest: mmap: %w", err)
	}
	return &Frontend{conn: c, Mem: mem, memFD: fd, next: 4096}, nil
}

// Close disconnects and frees the guest memory.
func (f *Frontend) Close() error {
	err := f.conn.Close()
	for _, q := range f.Queues {
		if q != nil {
			unix.Close(q.kickFD)
			unix.Close(q.callFD)
		}
	}
	unix.Munmap(f.Mem)
	unix.Close(f.memFD)
	return err
}

// Conn is the raw socket, for tests that write malformed bytes.
func (f *Frontend) Conn() *net.UnixConn { return f.conn }

// MemFD is the memfd backing guest memory.
func (f *Frontend) MemFD() int { return f.memFD }

// UserAddr is the address the harness reports as its "VMM virtual address" for gpa.
func (f *Frontend) UserAddr(gpa uint64) uint64 {
	return uint64(uintptr(unsafe.Pointer(&f.Mem[0]))) + gpa
}

// Alloc reserves n bytes of guest memory aligned to align and returns their guest address.
func (f *Frontend) Alloc(n, align uint64) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	a := (f.next + align - 1) &^ (align - 1)
	if a+n > uint64(len(f.Mem)) {
		panic(fmt.Sprintf("vhostusertest: guest memory exhausted (%d bytes)", len(f.Mem)))
	}
	f.next = a + n
	return a
}

// Send writes one message.
func (f *Frontend) Send(req, flags uint32, payload []byte, fds ...int) error {
	b := make([]byte, 12+len(payload))
	binary.LittleEndian.PutUint32(b, req)
	binary.LittleEndian.PutUint32(b[4:], flags|1)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[12:], payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := f.conn.WriteMsgUnix(b, oob, nil)
	return err
}

// Recv reads one reply.
func (f *Frontend) Recv(req uint32) ([]byte, error) {
	f.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer f.conn.SetReadDeadline(time.Time{})
	h := make([]byte, 12)
	if _, err := readFull(f.conn, h); err != nil {
		return nil, fmt.Errorf("vhostusertest: reply to %d: %w", req, err)
	}
	if got := binary.LittleEndian.Uint32(h); got != req {
		return nil, fmt.Errorf("vhostusertest: reply for request %d, want %d", got, req)
	}
	if binary.LittleEndian.Uint32(h[4:])&0x4 == 0 {
		return nil, errors.New("vhostusertest: reply without the reply flag")
	}
	p := make([]byte, binary.LittleEndian.Uint32(h[8:]))
	if _, err := readFull(f.conn, p); err != nil {
		return nil, err
	}
	return p, nil
}

func readFull(c *net.UnixConn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := c.Read(b[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// Call sends a message and, when the backend acks (REPLY_ACK negotiated), checks the ack.
func (f *Frontend) Call(req uint32, payload []byte, fds ...int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	flags := uint32(0)
	ack := f.Protocol&ProtoReplyAck != 0
	if ack {
		flags = FlagNeedReply
	}
	if err := f.Send(req, flags, payload, fds...); err != nil {
		return err
	}
	if !ack {
		return nil
	}
	p, err := f.Recv(req)
	if err != nil {
		return err
	}
	if len(p) != 8 {
		return fmt.Errorf("vhostusertest: ack of %d bytes", len(p))
	}
	if v := binary.LittleEndian.Uint64(p); v != 0 {
		return fmt.Errorf("vhostusertest: backend refused request %d (ack %d)", req, v)
	}
	return nil
}

// Get sends a request that the backend answers with a payload.
func (f *Frontend) Get(req uint32, payload []byte) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.Send(req, 0, payload); err != nil {
		return nil, err
	}
	return f.Recv(req)
}

// GetU64 is Get for the requests that answer one u64.
func (f *Frontend) GetU64(req uint32) (uint64, error) {
	p, err := f.Get(req, nil)
	if err != nil {
		return 0, err
	}
	if len(p) != 8 {
		return 0, fmt.Errorf("vhostusertest: reply to %d has %d bytes", req, len(p))
	}
	return binary.LittleEndian.Uint64(p), nil
}

func u64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

func state(idx, num uint32) []byte {
	b := binary.LittleEndian.AppendUint32(nil, idx)
	return binary.LittleEndian.AppendUint32(b, num)
}

// Setup negotiates features (want ∩ offered), sends the memory table and starts nq queues of
// size qsize, as QEMU does.
func (f *Frontend) Setup(want uint64, nq int, qsize uint16) error {
	feat, err := f.GetU64(GetFeatures)
	if err != nil {
		return err
	}
	if feat&FeatureProto != 0 {
		pf, err := f.GetU64(GetProtocolFeatures)
		if err != nil {
			return err
		}
		f.Protocol = pf & (ProtoReplyAck | ProtoConfig | ProtoMQ)
		if err := f.Call(SetProtocolFeatures, u64(f.Protocol)); err != nil {
			return err
		}
	}
	if err := f.Call(SetOwner, nil); err != nil {
		return err
	}
	f.Features = feat & (want | FeatureProto | FeatureVersion1)
	if err := f.Call(SetFeatures, u64(f.Features)); err != nil {
		return err
	}
	if err := f.SendMemTable(); err != nil {
		return err
	}
	for i := 0; i < nq; i++ {
		if _, err := f.StartQueue(i, qsize); err != nil {
			return err
		}
	}
	return nil
}

// SendMemTable sends one region covering all guest memory.
func (f *Frontend) SendMemTable() error {
	p := make([]byte, 8+32)
	binary.LittleEndian.PutUint32(p, 1)
	binary.LittleEndian.PutUint64(p[8:], 0)
	binary.LittleEndian.PutUint64(p[16:], uint64(len(f.Mem)))
	binary.LittleEndian.PutUint64(p[24:], f.UserAddr(0))
	binary.LittleEndian.PutUint64(p[32:], 0)
	return f.Call(SetMemTable, p, f.memFD)
}

// StartQueue lays out queue idx in guest memory and starts it.
func (f *Frontend) StartQueue(idx int, size uint16) (*VQ, error) {
	q := &VQ{f: f, Index: idx, Size: size}
	q.Desc = f.Alloc(16*uint64(size), 4096)
	q.Avail = f.Alloc(6+2*uint64(size), 4)
	q.Used = f.Alloc(6+8*uint64(size), 4096)
	q.free = make([]uint16, 0, size)
	for i := int(size) - 1; i >= 0; i-- {
		q.free = append(q.free, uint16(i))
	}
	q.chainLen = map[uint16]int{}
	var err error
	if q.kickFD, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, err
	}
	if q.callFD, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return nil, err
	}
	for len(f.Queues) <= idx {
		f.Queues = append(f.Queues, nil)
	}
	f.Queues[idx] = q
	addr := make([]byte, 40)
	binary.LittleEndian.PutUint32(addr, uint32(idx))
	binary.LittleEndian.PutUint64(addr[8:], f.UserAddr(q.Desc))
	binary.LittleEndian.PutUint64(addr[16:], f.UserAddr(q.Used))
	binary.LittleEndian.PutUint64(addr[24:], f.UserAddr(q.Avail))
	for _, m := range []struct {
		req uint32
		p   []byte
		fds []int
	}{
		{SetVringNum, state(uint32(idx), uint32(size)), nil},
		{SetVringBase, state(uint32(idx), 0), nil},
		{SetVringAddr, addr, nil},
		{SetVringKick, u64(uint64(idx)), []int{q.kickFD}},
		{SetVringCall, u64(uint64(idx)), []int{q.callFD}},
		{SetVringEnable, state(uint32(idx), 1), nil},
	} {
		if err := f.Call(m.req, m.p, m.fds...); err != nil {
			return nil, fmt.Errorf("vhostusertest: start queue %d: %w", idx, err)
		}
	}
	return q, nil
}

// VQ is the driver side of one split virtqueue.
type VQ struct {
	f                  *Frontend
	Index              int
	Size               uint16
	Desc, Avail, Used  uint64 // guest addresses
	kickFD, callFD     int
	free               []uint16
	chainLen           map[uint16]int
	availIdx, lastUsed uint16
}

// Buf describes one buffer of a chain: Addr/Len in guest memory, Write for device-writable.
type Buf struct {
	Addr  uint64
	Len   uint32
	Write bool
}

func (q *VQ) mem() []byte { return q.f.Mem }

// PutDesc writes descriptor i directly (for tests that build hostile chains).
func (q *VQ) PutDesc(i uint16, addr uint64, n uint32, flags, next uint16) {
	d := q.mem()[q.Desc+16*uint64(i):]
	binary.LittleEndian.PutUint64(d, addr)
	binary.LittleEndian.PutUint32(d[8:], n)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

// Publish puts head on the available ring and bumps the index (no kick).
func (q *VQ) Publish(head uint16) {
	m := q.mem()
	binary.LittleEndian.PutUint16(m[q.Avail+4+2*uint64(q.availIdx%q.Size):], head)
	q.availIdx++
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&m[q.Avail])), uint32(q.availIdx)<<16)
}

// SetAvailIdx forces the available index (hostile tests).
func (q *VQ) SetAvailIdx(v uint16) {
	q.availIdx = v
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&q.mem()[q.Avail])), uint32(v)<<16)
}

// Add builds a chain from bufs with free descriptors and publishes it. It reports false when the
// ring has too few free descriptors.
func (q *VQ) Add(bufs []Buf) (uint16, bool) {
	if len(bufs) == 0 || len(bufs) > len(q.free) {
		return 0, false
	}
	ids := q.free[len(q.free)-len(bufs):]
	q.free = q.free[:len(q.free)-len(bufs)]
	for i, b := range bufs {
		var flags, next uint16
		if b.Write {
			flags |= DescWrite
		}
		if i+1 < len(bufs) {
			flags |= DescNext
			next = ids[i+1]
		}
		q.PutDesc(ids[i], b.Addr, b.Len, flags, next)
	}
	head := ids[0]
	q.chainLen[head] = len(bufs)
	// Remember the chain's descriptors in order so Reclaim can free them.
	q.Publish(head)
	return head, true
}

// AddIndirect publishes one indirect descriptor pointing at a table built from bufs at the
// guest address table, which the caller must not reuse before the chain completes. It reports
// false when the ring has no free descriptor.
func (q *VQ) AddIndirect(table uint64, bufs []Buf) (uint16, bool) {
	if len(q.free) == 0 {
		return 0, false
	}
	m := q.mem()
	for i, b := range bufs {
		d := m[table+16*uint64(i):]
		var flags, next uint16
		if b.Write {
			flags |= DescWrite
		}
		if i+1 < len(bufs) {
			flags |= DescNext
			next = uint16(i + 1)
		}
		binary.LittleEndian.PutUint64(d, b.Addr)
		binary.LittleEndian.PutUint32(d[8:], b.Len)
		binary.LittleEndian.PutUint16(d[12:], flags)
		binary.LittleEndian.PutUint16(d[14:], next)
	}
	head := q.free[len(q.free)-1]
	q.free = q.free[:len(q.free)-1]
	q.PutDesc(head, table, uint32(16*len(bufs)), DescIndirect, 0)
	q.chainLen[head] = 1
	q.Publish(head)
	return head, true
}

// Kick notifies the backend.
func (q *VQ) Kick() error {
	_, err := unix.Write(q.kickFD, u64(1))
	return err
}

// UsedIdx reads the device's used index.
func (q *VQ) UsedIdx() uint16 {
	return uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&q.mem()[q.Used]))) >> 16)
}

// UsedFlags reads the device's used flags.
func (q *VQ) UsedFlags() uint16 {
	return uint16(atomic.LoadUint32((*uint32)(unsafe.Pointer(&q.mem()[q.Used]))))
}

// Used is one completed chain.
type Used struct {
	Head uint16
	Len  uint32
}

// Reap returns completed chains without waiting and frees their descriptors.
func (q *VQ) Reap() []Used {
	var out []Used
	m := q.mem()
	for q.lastUsed != q.UsedIdx() {
		e := m[q.Used+4+8*uint64(q.lastUsed%q.Size):]
		u := Used{Head: uint16(binary.LittleEndian.Uint32(e)), Len: binary.LittleEndian.Uint32(e[4:])}
		q.lastUsed++
		q.release(u.Head)
		out = append(out, u)
	}
	// used_event: ask for a call as soon as the next chain completes (as Linux does).
	binary.LittleEndian.PutUint16(m[q.Avail+4+2*uint64(q.Size):], q.lastUsed)
	return out
}

func (q *VQ) release(head uint16) {
	n, ok := q.chainLen[head]
	if !ok {
		return
	}
	delete(q.chainLen, head)
	i := head
	m := q.mem()
	for k := 0; k < n; k++ {
		q.free = append(q.free, i)
		d := m[q.Desc+16*uint64(i):]
		i = binary.LittleEndian.Uint16(d[14:])
	}
}

// Wait blocks until at least one chain completes or timeout passes, and returns the completions.
func (q *VQ) Wait(timeout time.Duration) ([]Used, error) {
	deadline := time.Now().Add(timeout)
	for {
		if u := q.Reap(); len(u) > 0 {
			return u, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return nil, fmt.Errorf("vhostusertest: queue %d: no completion within %v", q.Index, timeout)
		}
		ms := min(left.Milliseconds()+1, 50) // re-check the ring even without a call (EVENT_IDX)
		fds := []unix.PollFd{{Fd: int32(q.callFD), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, int(ms)); err != nil && err != unix.EINTR {
			return nil, err
		}
		var b [8]byte
		unix.Read(q.callFD, b[:])
	}
}

// CallFD is the call eventfd (readable when the backend signals).
func (q *VQ) CallFD() int { return q.callFD }

// FreeCount is how many descriptors are free.
func (q *VQ) FreeCount() int { return len(q.free) }
