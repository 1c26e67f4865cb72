package vsock

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/vhostuser/vhostusertest"
)

type pollFd struct{ fd int }

func pollWait(fds []pollFd, ms int) {
	pfds := make([]unix.PollFd, len(fds))
	for i, f := range fds {
		pfds[i] = unix.PollFd{Fd: int32(f.fd), Events: unix.POLLIN}
	}
	unix.Poll(pfds, ms)
	var b [8]byte
	for _, f := range fds {
		unix.Read(f.fd, b[:])
	}
}

const testCID = 7

type rig struct {
	b   *Backend
	uds string
	f   *vhostusertest.Frontend
	g   *guest
}

func testLogger(t testing.TB) zerolog.Logger {
	if os.Getenv("VK_TEST_LOG") != "" {
		return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.TraceLevel)
	}
	return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
}

func startBackend(t testing.TB, mod func(*Config)) (*Backend, Config) {
	t.Helper()
	dir := t.TempDir()
	cfg := Config{Socket: filepath.Join(dir, "vhost.sock"), UDS: filepath.Join(dir, "vm.vsock"), CID: testCID, Logger: testLogger(t)}
	if mod != nil {
		mod(&cfg)
	}
	b, err := Serve(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("backend close: %v", err)
		}
	})
	return b, cfg
}

func connectFrontend(t testing.TB, cfg Config, features uint64) *vhostusertest.Frontend {
	t.Helper()
	f, err := vhostusertest.Dial(cfg.Socket, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Setup(features, 2, 256); err != nil {
		t.Fatal(err)
	}
	return f
}

func newRig(t testing.TB, features uint64, mod func(*Config)) *rig {
	b, cfg := startBackend(t, mod)
	f := connectFrontend(t, cfg, features)
	return &rig{b: b, uds: cfg.UDS, f: f, g: newGuest(t, f, testCID)}
}

func hostDial(t testing.TB, uds string, port uint32) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return addr.Dial(ctx, fmt.Sprintf("hvsock://%s:%d", uds, port))
}

func TestConfigReportsCID(t *testing.T) {
	_, cfg := startBackend(t, nil)
	f, err := vhostusertest.Dial(cfg.Socket, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	feat, err := f.GetU64(vhostusertest.GetFeatures)
	if err != nil {
		t.Fatal(err)
	}
	if feat&vhostusertest.FeatureVersion1 == 0 || feat&vhostusertest.FeatureProto == 0 {
		t.Fatalf("features %#x lack VERSION_1 or PROTOCOL_FEATURES", feat)
	}
	pf, err := f.GetU64(vhostusertest.GetProtocolFeatures)
	if err != nil {
		t.Fatal(err)
	}
	if pf&vhostusertest.ProtoConfig == 0 {
		t.Fatalf("protocol features %#x lack CONFIG", pf)
	}
	req := make([]byte, 12+8)
	binary.LittleEndian.PutUint32(req[4:], 8)
	p, err := f.Get(vhostusertest.GetConfig, req)
	if err != nil {
		t.Fatal(err)
	}
	if len(p) != 20 || binary.LittleEndian.Uint64(p[12:]) != testCID {
		t.Fatalf("GET_CONFIG = %x, want CID %d", p, testCID)
	}
	n, err := f.GetU64(vhostusertest.GetQueueNum)
	if err != nil || n < 2 {
		t.Fatalf("GET_QUEUE_NUM = %d, %v", n, err)
	}
}

var featureSets = map[string]uint64{
	"plain":    0,
	"eventidx": vhostusertest.FeatureEventIdx | vhostusertest.FeatureIndirect,
}

func TestHostToGuestEcho(t *testing.T) {
	for name, feat := range featureSets {
		t.Run(name, func(t *testing.T) {
			r := newRig(t, feat, nil)
			l := r.g.listen(1024)
			go func() {
				for c := range l {
					go func() {
						io.Copy(c, c) // echo until the host shuts down its side
						c.Close()
					}()
				}
			}()
			hc, err := hostDial(t, r.uds, 1024)
			if err != nil {
				t.Fatal(err)
			}
			defer hc.Close()
			want := make([]byte, 3<<20) // far beyond both buffers: credit must flow
			rand.Read(want)
			errc := make(chan error, 1)
			go func() {
				_, err := hc.Write(want)
				hc.(*net.UnixConn).CloseWrite()
				errc <- err
			}()
			got, err := io.ReadAll(hc)
			if err != nil {
				t.Fatalf("read echo: %v", err)
			}
			if err := <-errc; err != nil {
				t.Fatalf("write: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("echo returned %d bytes, want %d identical", len(got), len(want))
			}
		})
	}
}

func TestGuestToHostEcho(t *testing.T) {
	r := newRig(t, featureSets["eventidx"], nil)
	l, err := addr.Listen(fmt.Sprintf("hvsock://%s:%d", r.uds, 5000))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	gc, err := r.g.dial(5000)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 2<<20)
	rand.Read(want)
	go func() {
		gc.Write(want)
		gc.CloseWrite()
	}()
	got, err := io.ReadAll(gc)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("guest got %d bytes back, want %d identical", len(got), len(want))
	}
	if err := gc.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestRefusals(t *testing.T) {
	r := newRig(t, 0, nil)
	// Host → guest port nobody listens on: the guest resets, the host sees ErrRefused.
	if c, err := hostDial(t, r.uds, 4242); !errors.Is(err, addr.ErrRefused) {
		if c != nil {
			c.Close()
		}
		t.Fatalf("dial to a closed guest port: %v, want ErrRefused", err)
	}
	// Guest → host port with no listener: RST.
	if _, err := r.g.dial(4343); !errors.Is(err, errReset) {
		t.Fatalf("guest dial without host listener: %v, want reset", err)
	}
	// Garbage instead of CONNECT: closed without a reply.
	c, err := net.Dial("unix", r.uds)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("HELLO 12\n"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 10)); n != 0 || err == nil {
		t.Fatalf("bad CONNECT line answered: %d %v", n, err)
	}
	c.Close()
}

func TestManyConnections(t *testing.T) {
	r := newRig(t, featureSets["eventidx"], nil)
	l := r.g.listen(1024)
	go func() {
		for c := range l {
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	hl, err := addr.Listen(fmt.Sprintf("hvsock://%s:%d", r.uds, 6000))
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	go func() {
		for {
			c, err := hl.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	const n = 40
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := 0; i < n; i++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			hc, err := hostDial(t, r.uds, 1024)
			if err != nil {
				errs <- err
				return
			}
			defer hc.Close()
			want := make([]byte, 100<<10+i)
			rand.Read(want)
			go func() { hc.Write(want); hc.(*net.UnixConn).CloseWrite() }()
			got, err := io.ReadAll(hc)
			if err != nil || !bytes.Equal(got, want) {
				errs <- fmt.Errorf("host conn %d: %d bytes, %v", i, len(got), err)
			}
		}()
		go func() {
			defer wg.Done()
			gc, err := r.g.dial(6000)
			if err != nil {
				errs <- err
				return
			}
			want := make([]byte, 50<<10+i)
			rand.Read(want)
			go func() { gc.Write(want); gc.CloseWrite() }()
			got, err := io.ReadAll(gc)
			if err != nil || !bytes.Equal(got, want) {
				errs <- fmt.Errorf("guest conn %d: %d bytes, %v", i, len(got), err)
			}
			if err := gc.Close(); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// Every connection must be gone from the backend.
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.b.dev.mu.Lock()
		left := len(r.b.dev.conns)
		r.b.dev.mu.Unlock()
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections left in the backend", left)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestHostCloseShutsGuestDown(t *testing.T) {
	r := newRig(t, 0, nil)
	l := r.g.listen(1024)
	hc, err := hostDial(t, r.uds, 1024)
	if err != nil {
		t.Fatal(err)
	}
	gc := <-l
	hc.Write([]byte("bye"))
	hc.Close()
	got, err := io.ReadAll(gc)
	if err != nil || string(got) != "bye" {
		t.Fatalf("guest read %q, %v; want \"bye\" then EOF", got, err)
	}
	if err := gc.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestGuestResetClosesHost(t *testing.T) {
	r := newRig(t, 0, nil)
	l := r.g.listen(1024)
	hc, err := hostDial(t, r.uds, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	gc := <-l
	r.g.send(header{SrcPort: gc.key.local, DstPort: gc.key.peer, Op: opRST}, nil)
	hc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(hc); err != nil {
		t.Fatalf("host read after guest RST: %v, want EOF", err)
	}
}

func TestGuestCreditOverrunIsReset(t *testing.T) {
	r := newRig(t, 0, func(c *Config) { c.BufAlloc = 8192 })
	l := r.g.listen(1024)
	hc, err := hostDial(t, r.uds, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	gc := <-l
	// Ignore the credit the backend granted and push 64 KiB at once.
	r.g.send(header{SrcPort: gc.key.local, DstPort: gc.key.peer, Op: opRW, BufAlloc: guestBufAlloc}, make([]byte, 64<<10))
	deadline := time.Now().Add(5 * time.Second)
	for !gc.isReset() {
		if time.Now().After(deadline) {
			t.Fatal("backend did not reset a connection that overran its credit")
		}
		time.Sleep(10 * time.Millisecond)
	}
	hc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, _ := io.ReadAll(hc); len(b) > 8192 {
		t.Fatalf("host got %d bytes, more than the granted credit", len(b))
	}
}

func TestForeignCIDsIgnored(t *testing.T) {
	r := newRig(t, 0, nil)
	hl, err := addr.Listen(fmt.Sprintf("hvsock://%s:%d", r.uds, 7000))
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		if c, err := hl.Accept(); err == nil {
			accepted <- struct{}{}
			c.Close()
		}
	}()
	// A REQUEST claiming another source CID must not reach the host.
	r.g.txCh <- packet{h: header{SrcCID: 99, DstCID: hostCID, SrcPort: 1, DstPort: 7000, Type: typeStream, Op: opRequest, BufAlloc: 4096}}
	select {
	case <-accepted:
		t.Fatal("spoofed source CID reached the host listener")
	case <-time.After(300 * time.Millisecond):
	}
	// SEQPACKET and other types are refused with RST.
	r.g.mu.Lock()
	before := r.g.rsts
	r.g.mu.Unlock()
	r.g.txCh <- packet{h: header{SrcCID: testCID, DstCID: hostCID, SrcPort: 2, DstPort: 7000, Type: 2, Op: opRequest, BufAlloc: 4096}}
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.g.mu.Lock()
		n := r.g.rsts
		r.g.mu.Unlock()
		if n > before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("SEQPACKET request not reset")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestFrontendReconnect(t *testing.T) {
	b, cfg := startBackend(t, nil)
	for round := 0; round < 3; round++ {
		f, err := vhostusertest.Dial(cfg.Socket, 16<<20)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Setup(0, 2, 64); err != nil {
			t.Fatal(err)
		}
		g := newGuest(t, f, testCID)
		l := g.listen(1024)
		go func() {
			for c := range l {
				go func() { io.Copy(c, c); c.Close() }()
			}
		}()
		hc, err := hostDial(t, cfg.UDS, 1024)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		hc.Write([]byte("ping"))
		buf := make([]byte, 4)
		if _, err := io.ReadFull(hc, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("round %d: echo %q %v", round, buf, err)
		}
		// The VMM dies with the connection open: the host side must see it closed.
		g.close()
		f.Close()
		hc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(hc); err != nil {
			t.Fatalf("round %d: host conn after VMM loss: %v", round, err)
		}
		hc.Close()
	}
	_ = b
}

// TestGuestAcceptsAndClosesAtOnce: a guest that accepts and closes before the backend has
// written "OK" still gives the host OK followed by EOF, not a refusal (Cloud Hypervisor's
// behaviour; agents that answer one request and close rely on it).
func TestGuestAcceptsAndClosesAtOnce(t *testing.T) {
	r := newRig(t, 0, nil)
	l := r.g.listen(1099)
	go func() {
		for c := range l {
			go c.Close()
		}
	}()
	for i := 0; i < 20; i++ {
		c, err := hostDial(t, r.uds, 1099)
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
			t.Fatalf("round %d: read %q %v, want EOF", i, b, err)
		}
		c.Close()
	}
}

// TestDataRightAfterConnect: bytes the host pipelines behind its CONNECT line reach the guest.
func TestDataRightAfterConnect(t *testing.T) {
	r := newRig(t, 0, nil)
	l := r.g.listen(1024)
	c, err := net.Dial("unix", r.uds)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("CONNECT 1024\nearly bytes"))
	gc := <-l
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line := make([]byte, 0, 32)
	b := make([]byte, 1)
	for {
		if _, err := c.Read(b); err != nil {
			t.Fatalf("OK line: %v", err)
		}
		if b[0] == '\n' {
			break
		}
		line = append(line, b[0])
	}
	if !bytes.HasPrefix(line, []byte("OK ")) {
		t.Fatalf("reply %q", line)
	}
	got := make([]byte, len("early bytes"))
	if _, err := io.ReadFull(gc, got); err != nil || string(got) != "early bytes" {
		t.Fatalf("guest read %q %v", got, err)
	}
}
