package vhostuser

import (
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testMem maps two adjacent regions of a memfd: [0, 1 MiB) and [1 MiB, 2 MiB), with user
// addresses equal to guest addresses. It returns the memory and the test's own view.
func testMem(t testing.TB) (*Memory, []byte) {
	t.Helper()
	const size = 2 << 20
	fd, err := unix.MemfdCreate("vq-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	view, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	var regs []*region
	for i := uint64(0); i < 2; i++ {
		dup, _ := unix.Dup(fd)
		r, err := mapRegion(dup, MemRegion{GuestAddr: i << 20, Size: 1 << 20, UserAddr: i << 20, MmapOffset: i << 20})
		if err != nil {
			t.Fatal(err)
		}
		regs = append(regs, r)
	}
	m, err := newMemory(regs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.unmap(); unix.Munmap(view) })
	return m, view
}

const (
	tDesc  = 0x1000
	tAvail = 0x2000
	tUsed  = 0x3000
	tSize  = 16
)

func testQueue(t testing.TB, features uint64) (*Queue, []byte) {
	m, view := testMem(t)
	q, err := newQueue(0, tSize, m, VringAddr{Desc: tDesc, Avail: tAvail, Used: tUsed}, 0, features, -1, -1)
	if err != nil {
		t.Fatal(err)
	}
	return q, view
}

func putDesc(view []byte, table uint64, i int, addr uint64, n uint32, flags, next uint16) {
	d := view[table+16*uint64(i):]
	binary.LittleEndian.PutUint64(d, addr)
	binary.LittleEndian.PutUint32(d[8:], n)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

func publish(view []byte, idx uint16, heads ...uint16) {
	for i, h := range heads {
		binary.LittleEndian.PutUint16(view[tAvail+4+2*uint64((int(idx)+i)%tSize):], h)
	}
	binary.LittleEndian.PutUint16(view[tAvail+2:], idx+uint16(len(heads)))
}

func TestChainAcrossRegions(t *testing.T) {
	q, view := testQueue(t, FeatureIndirectDesc)
	putDesc(view, tDesc, 0, 0x10000, 100, descNext, 1)
	putDesc(view, tDesc, 1, 1<<20-10, 20, descWrite, 0) // spans the region boundary
	publish(view, 0, 0)
	c, err := q.Pop()
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Readable) != 1 || len(c.Readable[0]) != 100 || len(c.Writable) != 2 || c.WritableLen() != 20 {
		t.Fatalf("chain %d readable, %d writable (%d bytes)", len(c.Readable), len(c.Writable), c.WritableLen())
	}
	q.Done(c.Head, 20)
	if got := binary.LittleEndian.Uint16(view[tUsed+2:]); got != 1 {
		t.Fatalf("used idx %d", got)
	}
	if c, err := q.Pop(); c != nil || err != nil {
		t.Fatalf("empty ring popped %v %v", c, err)
	}
}

// TestPopIntoReuses pops chains of different shapes into one Chain: each pop replaces what the
// last one left, and once the vectors have grown nothing is allocated.
func TestPopIntoReuses(t *testing.T) {
	q, view := testQueue(t, FeatureIndirectDesc)
	putDesc(view, tDesc, 0, 0x10000, 100, descNext, 1)
	putDesc(view, tDesc, 1, 0x20000, 30, descNext, 2)
	putDesc(view, tDesc, 2, 0x30000, 40, descWrite, 0)
	putDesc(view, tDesc, 3, 0x40000, 8, descWrite, 0) // a chain with only a writable buffer
	var c Chain
	for round := 0; round < 3; round++ {
		publish(view, uint16(2*round), 0, 3)
		if ok, err := q.PopInto(&c); !ok || err != nil {
			t.Fatalf("pop: %v %v", ok, err)
		}
		if c.Head != 0 || len(c.Readable) != 2 || c.ReadableLen() != 130 || len(c.Writable) != 1 || c.WritableLen() != 40 {
			t.Fatalf("first chain: head %d, %d readable (%d bytes), %d writable", c.Head, len(c.Readable), c.ReadableLen(), len(c.Writable))
		}
		q.Done(c.Head, 0)
		if ok, err := q.PopInto(&c); !ok || err != nil {
			t.Fatalf("pop: %v %v", ok, err)
		}
		if c.Head != 3 || len(c.Readable) != 0 || len(c.Writable) != 1 || c.WritableLen() != 8 {
			t.Fatalf("second chain kept the first one's buffers: head %d, %d readable, %d writable", c.Head, len(c.Readable), len(c.Writable))
		}
		q.Done(c.Head, 0)
		if ok, err := q.PopInto(&c); ok || err != nil {
			t.Fatalf("empty ring popped: %v %v", ok, err)
		}
	}
	allocs := testing.AllocsPerRun(100, func() {
		publish(view, loadIdx(view), 0)
		q.PopInto(&c)
		q.Done(c.Head, 0)
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per pop", allocs)
	}
}

func loadIdx(view []byte) uint16 { return binary.LittleEndian.Uint16(view[tAvail+2:]) }

func TestHostileChains(t *testing.T) {
	cases := map[string]func(view []byte){
		"outside memory": func(v []byte) { putDesc(v, tDesc, 0, 4<<20, 16, 0, 0) },
		"address overflow": func(v []byte) {
			putDesc(v, tDesc, 0, ^uint64(0)-4, 16, 0, 0)
		},
		"absurd length": func(v []byte) { putDesc(v, tDesc, 0, 0x10000, 0xffffffff, 0, 0) },
		"loop": func(v []byte) {
			putDesc(v, tDesc, 0, 0x10000, 1, descNext, 1)
			putDesc(v, tDesc, 1, 0x10000, 1, descNext, 0)
		},
		"self loop": func(v []byte) { putDesc(v, tDesc, 0, 0x10000, 1, descNext, 0) },
		"next out of range": func(v []byte) {
			putDesc(v, tDesc, 0, 0x10000, 1, descNext, tSize)
		},
		"readable after writable": func(v []byte) {
			putDesc(v, tDesc, 0, 0x10000, 1, descWrite|descNext, 1)
			putDesc(v, tDesc, 1, 0x10000, 1, 0, 0)
		},
		"nested indirect": func(v []byte) {
			putDesc(v, tDesc, 0, 0x20000, 32, descIndirect, 0)
			putDesc(v, 0x20000, 0, 0x30000, 16, descIndirect, 0)
		},
		"indirect bad size": func(v []byte) { putDesc(v, tDesc, 0, 0x20000, 17, descIndirect, 0) },
		"indirect huge":     func(v []byte) { putDesc(v, tDesc, 0, 0x20000, 16*(maxIndirectEntries+1), descIndirect, 0) },
		"indirect outside":  func(v []byte) { putDesc(v, tDesc, 0, 3<<20, 64, descIndirect, 0) },
		"indirect loop": func(v []byte) {
			putDesc(v, tDesc, 0, 0x20000, 32, descIndirect, 0)
			putDesc(v, 0x20000, 0, 0x10000, 1, descNext, 1)
			putDesc(v, 0x20000, 1, 0x10000, 1, descNext, 0)
		},
		"indirect next out of table": func(v []byte) {
			putDesc(v, tDesc, 0, 0x20000, 32, descIndirect, 0)
			putDesc(v, 0x20000, 0, 0x10000, 1, descNext, 5)
		},
	}
	for name, build := range cases {
		t.Run(name, func(t *testing.T) {
			q, view := testQueue(t, FeatureIndirectDesc)
			build(view)
			publish(view, 0, 0)
			c, err := q.Pop()
			if !errors.Is(err, ErrQueueBroken) {
				t.Fatalf("Pop = %v, %v; want ErrQueueBroken", c, err)
			}
			// The queue stays broken: no further processing of hostile state.
			if _, err := q.Pop(); !errors.Is(err, ErrQueueBroken) {
				t.Fatalf("second Pop = %v", err)
			}
		})
	}
	t.Run("head out of range", func(t *testing.T) {
		q, view := testQueue(t, 0)
		publish(view, 0, tSize+3)
		if _, err := q.Pop(); !errors.Is(err, ErrQueueBroken) {
			t.Fatalf("Pop = %v", err)
		}
	})
	t.Run("avail index jump", func(t *testing.T) {
		q, view := testQueue(t, 0)
		binary.LittleEndian.PutUint16(view[tAvail+2:], tSize+1)
		if _, err := q.Pop(); !errors.Is(err, ErrQueueBroken) {
			t.Fatalf("Pop = %v", err)
		}
	})
	t.Run("indirect without feature", func(t *testing.T) {
		q, view := testQueue(t, 0)
		putDesc(view, tDesc, 0, 0x20000, 16, descIndirect, 0)
		putDesc(view, 0x20000, 0, 0x10000, 4, 0, 0)
		publish(view, 0, 0)
		if _, err := q.Pop(); !errors.Is(err, ErrQueueBroken) {
			t.Fatalf("Pop = %v", err)
		}
	})
}

func TestRingsOutsideMemoryRefused(t *testing.T) {
	m, _ := testMem(t)
	for name, a := range map[string]VringAddr{
		"desc":       {Desc: 2<<20 - 8, Avail: tAvail, Used: tUsed},
		"avail":      {Desc: tDesc, Avail: 5 << 20, Used: tUsed},
		"used":       {Desc: tDesc, Avail: tAvail, Used: ^uint64(0) - 2},
		"misaligned": {Desc: tDesc + 1, Avail: tAvail, Used: tUsed},
	} {
		if _, err := newQueue(0, tSize, m, a, 0, 0, -1, -1); err == nil {
			t.Errorf("%s: queue accepted", name)
		}
	}
	for _, n := range []uint16{0, 3, 100} {
		if _, err := newQueue(0, n, m, VringAddr{Desc: tDesc, Avail: tAvail, Used: tUsed}, 0, 0, -1, -1); err == nil {
			t.Errorf("size %d accepted", n)
		}
	}
}

func TestEventIdxSuppression(t *testing.T) {
	q, view := testQueue(t, FeatureEventIdx)
	// Driver asks to be notified when used idx passes 5 (used_event = 5).
	binary.LittleEndian.PutUint16(view[tAvail+4+2*tSize:], 5)
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	q.callFD = efd
	var b [8]byte
	signals := 0
	for i := 0; i < 8; i++ {
		putDesc(view, tDesc, i, 0x10000, 1, descWrite, 0)
		publish(view, uint16(i), uint16(i))
		c, err := q.Pop()
		if err != nil || c == nil {
			t.Fatal(err)
		}
		q.Done(c.Head, 1)
		if n, _ := unix.Read(efd, b[:]); n == 8 {
			signals++
		}
	}
	// One signal for the first completion (nothing signalled yet) and one crossing used_event.
	if signals != 2 {
		t.Fatalf("%d signals, want 2", signals)
	}
	// EnableNotify publishes avail_event = last_avail.
	q.EnableNotify()
	if ev := binary.LittleEndian.Uint16(view[tUsed+4+8*tSize:]); ev != 8 {
		t.Fatalf("avail_event %d, want 8", ev)
	}
}

// FuzzChain feeds arbitrary descriptor tables and avail rings to the walker: it must never
// panic or hand out memory outside the guest's.
func FuzzChain(f *testing.F) {
	seed := make([]byte, 16*tSize+4+2*tSize)
	f.Add(seed)
	d := make([]byte, len(seed))
	binary.LittleEndian.PutUint64(d, 0x10000)
	binary.LittleEndian.PutUint32(d[8:], 64)
	binary.LittleEndian.PutUint16(d[12:], descNext)
	binary.LittleEndian.PutUint16(d[14:], 1)
	binary.LittleEndian.PutUint64(d[16:], 0x20000)
	binary.LittleEndian.PutUint32(d[24:], 32)
	binary.LittleEndian.PutUint16(d[28:], descIndirect)
	binary.LittleEndian.PutUint16(d[16*tSize+2:], 2)
	f.Add(d)
	m, view := testMem(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		clear(view[tDesc : tDesc+16*tSize])
		clear(view[tAvail : tAvail+6+2*tSize])
		n := copy(view[tDesc:tDesc+16*tSize], b)
		if n < len(b) {
			copy(view[tAvail:tAvail+4+2*tSize], b[n:])
		}
		// An indirect table at 0x20000 taken from the input too.
		copy(view[0x20000:0x20000+256], b)
		q, err := newQueue(0, tSize, m, VringAddr{Desc: tDesc, Avail: tAvail, Used: tUsed}, 0, FeatureIndirectDesc|FeatureEventIdx, -1, -1)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2*tSize; i++ {
			c, err := q.Pop()
			if err != nil || c == nil {
				return
			}
			for _, s := range append(c.Readable, c.Writable...) {
				if len(s) > 2<<20 {
					t.Fatalf("buffer of %d bytes from 2 MiB of memory", len(s))
				}
			}
			q.Push(c.Head, uint32(c.WritableLen()))
		}
	})
}

// TestWaitKickThread: a wait returns for each kick (the counter is never read, so a second wait
// must not return for the first kick again), and for a stopped queue; the same for a wait with a
// timeout (which returns unkicked when it runs out), for a wait parked in the netpoller, and for
// the two taking turns on one queue (they share the epoll set, so a kick one consumed must not
// wake the other).
func TestWaitKickThread(t *testing.T) {
	timed := func(q *Queue) error {
		for {
			kicked, err := q.WaitKickThreadFor(5 * time.Millisecond)
			if kicked || err != nil {
				return err
			}
		}
	}
	turn := 0
	mixed := func(q *Queue) error {
		turn++
		if turn%2 == 0 {
			return q.WaitKickPark()
		}
		return q.WaitKickThread()
	}
	for name, waitOnce := range map[string]func(*Queue) error{
		"thread": (*Queue).WaitKickThread, "timed": timed, "park": (*Queue).WaitKickPark, "mixed": mixed,
	} {
		t.Run(name, func(t *testing.T) { testWaitKick(t, waitOnce) })
	}
}

func testWaitKick(t *testing.T, waitOnce func(*Queue) error) {
	m, _ := testMem(t)
	kick, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	q, err := newQueue(0, tSize, m, VringAddr{Desc: tDesc, Avail: tAvail, Used: tUsed}, 0, 0, kick, -1)
	if err != nil {
		t.Fatal(err)
	}
	defer q.release()
	wait := func() <-chan error {
		c := make(chan error, 1)
		go func() { c <- waitOnce(q) }()
		return c
	}
	one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	unix.Write(kick, one) // before the first wait: the set is made with the kick pending
	if err := <-wait(); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if kicked, err := q.WaitKickThreadFor(20 * time.Millisecond); kicked || err != nil {
		t.Fatalf("a timed wait without a kick: kicked %v, %v", kicked, err)
	}
	if d := time.Since(t0); d < 20*time.Millisecond {
		t.Fatalf("a timed wait of 20 ms returned after %v", d)
	}
	for i := 0; i < 4; i++ {
		c := wait()
		select {
		case err := <-c:
			t.Fatalf("wait %d returned without a new kick: %v", i, err)
		case <-time.After(50 * time.Millisecond):
		}
		unix.Write(kick, one)
		select {
		case err := <-c:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("wait %d missed a kick", i)
		}
	}
	c := wait()
	q.close()
	select {
	case err := <-c:
		if err == nil {
			t.Fatal("wait on a stopped queue returned no error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("stop did not end the wait")
	}
	if err := waitOnce(q); err == nil {
		t.Fatal("wait after stop returned no error")
	}
	if _, err := q.WaitKickThreadFor(time.Millisecond); err == nil {
		t.Fatal("timed wait after stop returned no error")
	}
}
