package vhostuser

import (
	"context"
	"encoding/binary"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// recorder is a Device that records which queues run.
type recorder struct {
	mu      sync.Mutex
	started map[int]*Queue
	resets  int
}

func (r *recorder) Features() uint64 { return 0 }
func (r *recorder) Queues() int      { return 2 }
func (r *recorder) Config() []byte   { return []byte{1, 2, 3, 4} }
func (r *recorder) Start(q *Queue) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.started[q.Index] = q
}
func (r *recorder) Stop(i int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.started, i)
}
func (r *recorder) Reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.resets++
}
func (r *recorder) running(i int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.started[i] != nil
}

// pair starts ServeConn on one end of a socketpair and returns the other end.
func pair(t testing.TB) (*net.UnixConn, *recorder, chan error) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "sp")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	front, back := conn(fds[0]), conn(fds[1])
	rec := &recorder{started: map[int]*Queue{}}
	done := make(chan error, 1)
	go func() { done <- ServeConn(context.Background(), back, rec, zerolog.Nop()) }()
	t.Cleanup(func() { front.Close(); <-done })
	return front, rec, done
}

func send(t testing.TB, c *net.UnixConn, req, flags uint32, p []byte, fds ...int) {
	t.Helper()
	if err := WriteMessage(c, req, flags, p, fds...); err != nil {
		t.Fatal(err)
	}
}

func recvReply(t testing.TB, c *net.UnixConn, req uint32) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, err := ReadMessage(c)
	if err != nil {
		t.Fatalf("reply to %s: %v", RequestName(req), err)
	}
	if m.Request != req || m.Flags&flagReply == 0 {
		t.Fatalf("reply %s flags %#x, want %s", RequestName(m.Request), m.Flags, RequestName(req))
	}
	return m.Payload
}

func ack(t testing.TB, c *net.UnixConn, req uint32, p []byte, fds ...int) uint64 {
	t.Helper()
	send(t, c, req, flagNeedReply, p, fds...)
	r := recvReply(t, c, req)
	if len(r) != 8 {
		t.Fatalf("ack of %d bytes", len(r))
	}
	return binary.LittleEndian.Uint64(r)
}

func vstate(i, n uint32) []byte {
	return binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, i), n)
}

func memfd(t testing.TB, size int64) int {
	fd, err := unix.MemfdCreate("srv-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	unix.Ftruncate(fd, size)
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func memTable(regs ...MemRegion) []byte {
	p := make([]byte, 8+32*len(regs))
	binary.LittleEndian.PutUint32(p, uint32(len(regs)))
	for i, r := range regs {
		r.Put(p[8+32*i:])
	}
	return p
}

func negotiate(t testing.TB, c *net.UnixConn) {
	send(t, c, reqGetFeatures, 0, nil)
	recvReply(t, c, reqGetFeatures)
	send(t, c, reqSetProtocolFeatures, 0, u64Payload(ProtoReplyAck|ProtoConfig))
}

func TestSessionValidatesMessages(t *testing.T) {
	c, rec, _ := pair(t)
	negotiate(t, c)
	if v := ack(t, c, reqSetFeatures, u64Payload(FeatureVersion1|FeatureProtocolFeatures)); v != 0 {
		t.Fatalf("SET_FEATURES refused: %d", v)
	}
	if v := ack(t, c, reqSetFeatures, u64Payload(1<<60)); v == 0 {
		t.Fatal("SET_FEATURES with unoffered bits accepted")
	}
	fd := memfd(t, 1<<20)
	// Wrong fd count, region larger than the fd, overlapping regions, too many regions.
	if v := ack(t, c, reqSetMemTable, memTable(MemRegion{Size: 1 << 20, UserAddr: 0x100000})); v == 0 {
		t.Fatal("SET_MEM_TABLE without fds accepted")
	}
	if v := ack(t, c, reqSetMemTable, memTable(MemRegion{Size: 4 << 20, UserAddr: 0x100000}), fd); v == 0 {
		t.Fatal("region larger than its memfd accepted")
	}
	if v := ack(t, c, reqSetMemTable, memTable(MemRegion{Size: 1 << 19, UserAddr: 0x100000}, MemRegion{GuestAddr: 1 << 18, Size: 1 << 18, UserAddr: 0x900000, MmapOffset: 1 << 19}), fd, fd); v == 0 {
		t.Fatal("overlapping regions accepted")
	}
	if v := ack(t, c, reqSetMemTable, memTable(MemRegion{Size: 1 << 20, UserAddr: 0x100000, MmapOffset: ^uint64(0) - 10}), fd); v == 0 {
		t.Fatal("overflowing mmap offset accepted")
	}
	// Out of order: enable and kick before the ring has addresses or memory — nothing starts.
	kick, _ := unix.Eventfd(0, unix.EFD_CLOEXEC)
	defer unix.Close(kick)
	ack(t, c, reqSetVringNum, vstate(0, 16))
	ack(t, c, reqSetVringKick, u64Payload(0), kick)
	ack(t, c, reqSetVringEnable, vstate(0, 1))
	if rec.running(0) {
		t.Fatal("ring started without memory or addresses")
	}
	if v := ack(t, c, reqSetVringNum, vstate(0, 3)); v == 0 {
		t.Fatal("ring size 3 accepted")
	}
	if v := ack(t, c, reqSetMemTable, memTable(MemRegion{Size: 1 << 20, UserAddr: 0x100000}), fd); v != 0 {
		t.Fatal("valid SET_MEM_TABLE refused")
	}
	// Ring addresses outside memory: refused when the ring would start.
	bad := make([]byte, 40)
	binary.LittleEndian.PutUint64(bad[8:], 0x900000)
	binary.LittleEndian.PutUint64(bad[16:], 0x101000)
	binary.LittleEndian.PutUint64(bad[24:], 0x102000)
	if v := ack(t, c, reqSetVringAddr, bad); v == 0 && rec.running(0) {
		t.Fatal("ring with a descriptor table outside memory started")
	}
	good := make([]byte, 40)
	binary.LittleEndian.PutUint64(good[8:], 0x100000)
	binary.LittleEndian.PutUint64(good[16:], 0x101000)
	binary.LittleEndian.PutUint64(good[24:], 0x102000)
	if v := ack(t, c, reqSetVringAddr, good); v != 0 || !rec.running(0) {
		t.Fatalf("valid ring did not start (ack %d)", v)
	}
	// GET_CONFIG, unsupported requests, GET_VRING_BASE.
	cfg := make([]byte, 12+4)
	binary.LittleEndian.PutUint32(cfg[4:], 4)
	send(t, c, reqGetConfig, 0, cfg)
	if r := recvReply(t, c, reqGetConfig); len(r) != 16 || r[12] != 1 || r[15] != 4 {
		t.Fatalf("GET_CONFIG = %x", r)
	}
	if v := ack(t, c, reqSetConfig, cfg); v == 0 {
		t.Fatal("SET_CONFIG accepted")
	}
	if v := ack(t, c, 99, nil); v == 0 {
		t.Fatal("unknown request acked as success")
	}
	send(t, c, reqGetVringBase, 0, vstate(0, 0))
	if r := recvReply(t, c, reqGetVringBase); len(r) != 8 || rec.running(0) {
		t.Fatalf("GET_VRING_BASE = %x, running %v", r, rec.running(0))
	}
}

func TestSessionEndsOnGarbage(t *testing.T) {
	for name, raw := range map[string][]byte{
		"bad version":       {1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0},
		"huge payload":      {1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f},
		"truncated":         {1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 1, 2},
		"reply flag":        {1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0},
		"ring out of range": append([]byte{11, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0}, vstate(50, 0)...),
	} {
		t.Run(name, func(t *testing.T) {
			c, rec, done := pair(t)
			c.Write(raw)
			c.CloseWrite()
			select {
			case <-done:
				done <- nil
			case <-time.After(5 * time.Second):
				t.Fatal("session did not end")
			}
			if rec.resets != 1 {
				t.Fatalf("%d resets", rec.resets)
			}
		})
	}
}

func TestServeAcceptsAfterDisconnect(t *testing.T) {
	sock := t.TempDir() + "/s"
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{started: map[int]*Queue{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, l, rec, zerolog.Nop()) }()
	for i := 0; i < 3; i++ {
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		send(t, c, reqGetFeatures, 0, nil)
		if r := recvReply(t, c, reqGetFeatures); binary.LittleEndian.Uint64(r)&FeatureVersion1 == 0 {
			t.Fatal("no VERSION_1")
		}
		c.Write([]byte("garbage that ends the session"))
		c.Close()
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// FuzzSession feeds arbitrary bytes to a session as if from a frontend: it must end or keep
// going, never panic.
func FuzzSession(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0})
	f.Add(append([]byte{8, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0}, vstate(0, 16)...))
	f.Add(append([]byte{24, 0, 0, 0, 1, 0, 0, 0, 16, 0, 0, 0}, make([]byte, 16)...))
	f.Add(append([]byte{5, 0, 0, 0, 1, 0, 0, 0, 40, 0, 0, 0}, memTable(MemRegion{Size: 4096})...))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, _, done := pair(t)
		c.Write(b)
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4096)
		for {
			if _, err := c.Read(buf); err != nil {
				break
			}
		}
		select {
		case err := <-done:
			done <- err
		case <-time.After(5 * time.Second):
			t.Fatal("session did not end at EOF")
		}
	})
}

func FuzzParse(f *testing.F) {
	f.Add(memTable(MemRegion{GuestAddr: 1, Size: 2, UserAddr: 3, MmapOffset: 4}))
	f.Add(make([]byte, 40))
	f.Add([]byte{1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		if rs, err := ParseMemTable(b); err == nil && (len(rs) == 0 || len(rs) > maxMemRegions) {
			t.Fatalf("%d regions", len(rs))
		}
		ParseVringAddr(b)
		if _, _, size, err := ParseHeader(b); err == nil && size > maxPayload {
			t.Fatalf("size %d", size)
		}
	})
}
