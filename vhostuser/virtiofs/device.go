// Package virtiofs serves a host directory to a guest as a virtio-fs device over vhost-user, for
// Cloud Hypervisor (--fs tag=…,socket=…, with --memory shared=on) and QEMU
// (vhost-user-fs-device / vhost-user-fs-pci with a shared memfd memory backend).
//
// FUSE requests are decoded by go-fuse's ProtocolServer (fuse.NewProtocolServer), except the ten
// opcodes a guest sends by the thousand, which a fast path (fastpath.go) answers without
// go-fuse's per-request allocation, its replies held to go-fuse's by tests. Both call our own
// pass-through file system (passthrough.go: an O_PATH descriptor per inode, every operation
// relative to one, as C virtiofsd's passthrough_ll). Vhost-user and the virtqueues are
// ours (package vhostuser), because go-fuse keeps its vhost-user layer internal and it lacks what
// we need: bounded and validated descriptor walking, indirect descriptors, EVENT_IDX, REPLY_ACK,
// memory-slot messages, concurrent request handling and reconnect. go-fuse's loopback node tree
// was replaced because it resolves paths from the share's root and cost 25-40% more CPU per
// small request than the C daemon.
//
// Security model: a hostile guest must not reach anything outside the shared directory. The
// primary defence is the sandbox (Sandbox "namespace"): the daemon re-executes itself in a new
// mount namespace (and user namespace when not root), bind-mounts the share nosuid,nodev (and
// read-only with ReadOnly), pivots its root into it and detaches the old root, so no path, symlink,
// "..", rename race or hard link can name a host file: there is none left in its view. The
// file system never resolves a path from the root, never follows a symlink, refuses names with
// '/', ".", ".." or NUL and will not create or open device nodes; the request guard (guard.go)
// applies the share's policy in every mode: read-only shares refuse every mutation, xattrs are off
// unless enabled and file capabilities and trusted.* cannot be set. Descriptors are bounded below
// RLIMIT_NOFILE; running out gives the guest EMFILE, not a crash.
//
// Concurrency: each started queue has one goroutine that pops requests and answers them inline;
// requests that wait by design (SETLKW, FSYNC, …) run on a goroutine of their own, and any other
// request that runs longer than 25–50 ms hands the popping to a new goroutine (a per-queue
// watchdog decides), so at most Config.Workers requests per queue run at once and a blocked one
// holds the others up for at most that long. Stop waits for all of them.
package virtiofs

import (
	"encoding/binary"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/vhostuser"
)

// device is the virtio-fs vhostuser.Device.
type device struct {
	log        zerolog.Logger
	nq         int // 1 hiprio + request queues
	workers    int
	newSession func() (*session, error)
	takeover   time.Duration // see the constant

	ops [len(opNames)]atomic.Uint64 // requests answered by opcode since the frontend came

	mu      sync.Mutex
	s       *session // the FUSE session; replaced when the guest sends FUSE_INIT again
	inited  bool     // the current session has seen FUSE_INIT
	runners map[int]*runner
}

type runner struct {
	stop chan struct{}
	done chan struct{}
}

func (d *device) Features() uint64 { return 0 }
func (d *device) Queues() int      { return d.nq }

// Config: the VMM supplies the tag and queue count to the guest itself (QEMU's and Cloud
// Hypervisor's vhost-user-fs never read the backend's config space).
func (d *device) Config() []byte { return nil }

func (d *device) session() (*session, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.sessionLocked()
}

// sessionLocked returns the current FUSE session, making one if there is none; d.mu is held.
func (d *device) sessionLocked() (*session, error) {
	if d.s == nil {
		s, err := d.newSession()
		if err != nil {
			return nil, err
		}
		d.s = s
	}
	return d.s, nil
}

// replaceLocked swaps in s (or none) and releases the old session's descriptors; requests still
// running on it keep what they use until they finish. d.mu is held.
func (d *device) replaceLocked(s *session) {
	if d.s != nil {
		d.s.close()
	}
	d.s = s
}

func (d *device) Start(q *vhostuser.Queue) {
	if _, err := d.session(); err != nil {
		d.log.Error().Err(err).Msg("virtiofs: cannot start the file system")
		return
	}
	r := &runner{stop: make(chan struct{}), done: make(chan struct{})}
	d.mu.Lock()
	if d.runners == nil {
		d.runners = map[int]*runner{}
	}
	d.runners[q.Index] = r
	d.mu.Unlock()
	go d.serve(q, r)
}

func (d *device) Stop(index int) {
	d.mu.Lock()
	r := d.runners[index]
	delete(d.runners, index)
	s := d.s
	d.mu.Unlock()
	if r == nil {
		return
	}
	close(r.stop)
	for {
		if s != nil {
			s.fs.cancelWaits() // a lock wait must not keep the queue from stopping
		}
		select {
		case <-r.done:
			return
		case <-time.After(50 * time.Millisecond): // a wait that began after the cancel
		}
	}
}

// Reset drops the FUSE session: the next frontend (a rebooted guest) starts with a fresh one, so
// inodes the old guest held are released.
func (d *device) Reset() {
	d.mu.Lock()
	d.replaceLocked(nil)
	d.inited = false
	d.mu.Unlock()
	d.logRequests()
}

// logRequests logs, at debug level, how many requests of each kind the frontend that just went
// sent (what a guest workload asks of the daemon, e.g. whether its closes cost a FLUSH each),
// and starts counting afresh.
func (d *device) logRequests() {
	counts := zerolog.Dict()
	total := uint64(0)
	for op := range d.ops {
		if n := d.ops[op].Swap(0); n > 0 {
			counts.Uint64(opName(uint32(op)), n)
			total += n
		}
	}
	if total > 0 {
		d.log.Debug().Uint64("total", total).Dict("requests", counts).Msg("virtiofs: frontend gone")
	}
}

// count notes one request with opcode op.
func (d *device) count(op uint32) { d.ops[opIndex(op)].Add(1) }

// opNames names the FUSE opcodes for logRequests; the last slot counts every other number.
var opNames = [...]string{"op0", "LOOKUP", "FORGET", "GETATTR", "SETATTR", "READLINK", "SYMLINK",
	"op7", "MKNOD", "MKDIR", "UNLINK", "RMDIR", "RENAME", "LINK", "OPEN", "READ", "WRITE", "STATFS",
	"RELEASE", "op19", "FSYNC", "SETXATTR", "GETXATTR", "LISTXATTR", "REMOVEXATTR", "FLUSH", "INIT",
	"OPENDIR", "READDIR", "RELEASEDIR", "FSYNCDIR", "GETLK", "SETLK", "SETLKW", "ACCESS", "CREATE",
	"INTERRUPT", "BMAP", "DESTROY", "IOCTL", "POLL", "NOTIFY_REPLY", "BATCH_FORGET", "FALLOCATE",
	"READDIRPLUS", "RENAME2", "LSEEK", "COPY_FILE_RANGE", "SETUPMAPPING", "REMOVEMAPPING",
	"SYNCFS", "TMPFILE", "STATX", "other"}

func opName(op uint32) string { return opNames[opIndex(op)] }

// opIndex is op's slot in opNames and device.ops: opcodes past the table share the last one.
func opIndex(op uint32) int { return int(min(op, uint32(len(opNames)-1))) }

// FUSE opcodes the device looks at before go-fuse decodes the request.
const (
	opFsync         = 20
	opInit          = 26
	opFsyncdir      = 30
	opSetlkw        = 33
	opFallocate     = 43
	opCopyFileRange = 47
)

// opcode reads the FUSE opcode of the request in iov (0 when the header is cut short).
func opcode(iov [][]byte) uint32 {
	var hdr [8]byte
	if vhostuser.Gather(hdr[:], iov, 0) < len(hdr) {
		return 0
	}
	return binary.LittleEndian.Uint32(hdr[4:])
}

// mayWait tells requests that wait by design (a lock wait) or routinely take milliseconds
// (flushing to the disk, allocating or copying ranges): they get their own goroutine at once
// instead of holding up the queue until the watchdog notices.
func mayWait(op uint32) bool {
	switch op {
	case opSetlkw, opFsync, opFsyncdir, opFallocate, opCopyFileRange:
		return true
	}
	return false
}

// sessionFor returns the FUSE session for a request. A second FUSE_INIT means the guest rebooted
// (or reset the device) without the VMM reconnecting: its old node IDs are gone, so it gets a
// fresh session instead of growing the old one forever.
func (d *device) sessionFor(ch *vhostuser.Chain, op uint32) (*session, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if op == opInit {
		if d.inited || d.s == nil {
			s, err := d.newSession()
			if err != nil {
				return nil, err
			}
			if d.inited {
				d.log.Info().Msg("virtiofs: guest re-initialised the file system; starting a fresh session")
			}
			d.replaceLocked(s)
		}
		d.inited = true
	}
	return d.sessionLocked()
}

// serve answers q's requests inline on the goroutine that pops them: no hand-off, no goroutine
// switch per request. Requests that wait by design or take milliseconds as a rule (SETLKW,
// FSYNC, FALLOCATE, COPY_FILE_RANGE: mayWait) get a goroutine of their own at once. Any other
// request that runs longer than takeover (an OPEN of a FIFO, a hung network mount under the
// share) hands the popping role to a fresh goroutine, so one blocked request never stalls the
// queue for more than a tick or two; the slow one finishes on its own goroutine and ends there.
// At most d.workers requests are in flight per queue; beyond that the queue waits.
//
// A watchdog goroutine decides the hand-over. It samples a counter the popper bumps around
// each request once per takeover tick and parks after parkAfter quiet ticks: a timer armed
// per request woke the runtime's netpoller each time (~10% of the daemon's CPU), and a 1 ms
// tick cost a guest issuing a request every millisecond more than twice the C daemon's CPU per
// request (each tick is a timer expiry, an epoll wake-up and a thread switch).
func (d *device) serve(q *vhostuser.Queue, r *runner) {
	defer close(r.done)
	var (
		wg sync.WaitGroup // every goroutine that may touch the queue or guest memory
		// seq is odd while the popping goroutine answers a request; the watchdog takes the
		// popping role from a request that runs too long by moving seq on (CAS odd → even).
		seq    atomic.Uint64
		parked atomic.Bool // the watchdog waits on wake for the next request
		wake   = make(chan struct{}, 1)
		busy   = make(chan struct{}, d.workers)
	)
	// answer replies to one request; fp is the calling goroutine's fast path (nil: go-fuse only).
	answer := func(ch *vhostuser.Chain, op uint32, fp *fastPath) {
		d.count(op)
		s, err := d.sessionFor(ch, op)
		if err != nil {
			d.log.Error().Err(err).Msg("virtiofs: cannot start a FUSE session")
			q.Done(ch.Head, 0)
			return
		}
		q.Done(ch.Head, handle(s, fp, ch, d.log))
	}
	loop := func() {
		defer wg.Done()
		debug.SetPanicOnFault(true) // a fault on unmapped guest memory fails the request
		// The popper keeps one OS thread: it sleeps in epoll_wait and wakes there for each kick.
		// Unlocked, the runtime moved it between four to six threads in a TCG guest's create
		// loop, and the kernel kept migrating them and the guest's vCPU between CPUs (popper
		// migrations ~340 → ~260 a second, daemon CPU per guest run −11%, measured). The
		// periodic yield below then costs a hand-off to another thread and back, ~125 a second
		// under load: less than what the lock saves.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		lastYield := time.Now()
		fp := new(fastPath)
		ch := new(vhostuser.Chain) // reused: popped into, answered, popped into again
		for {
			select {
			case <-r.stop:
				return
			default:
			}
			// The runtime takes a goroutine that has not passed through the scheduler for
			// 10 ms for one hogging its P: sysmon signals it to preempt and, when it is in a
			// system call (as this one nearly always is), takes the P away, which puts sysmon
			// back to waking every 20 µs. Yielding now and then avoids both: measured, sysmon
			// wake-ups fell from ~2.8 to ~0.1 per 1 MiB READ.
			if now := time.Now(); now.Sub(lastYield) > yieldEvery {
				runtime.Gosched()
				lastYield = now
			}
			q.DisableNotify()
			got, err := q.PopInto(ch)
			if err != nil {
				d.log.Error().Err(err).Int("queue", q.Index).Msg("virtiofs: queue stopped")
				return
			}
			if !got {
				// No busy-polling: on a shared host, spinning steals the CPU the guest (or the
				// VMM) needs to send the next request; measured slower than sleeping.
				if q.EnableNotify() {
					continue
				}
				if !wait(q, &lastYield) {
					return
				}
				continue
			}
			select {
			case busy <- struct{}{}:
			case <-r.stop:
				q.Done(ch.Head, 0)
				return
			}
			op := opcode(ch.Readable)
			if mayWait(op) {
				own := &vhostuser.Chain{Head: ch.Head, Readable: slices.Clone(ch.Readable), Writable: slices.Clone(ch.Writable)}
				wg.Add(1)
				go func() {
					defer wg.Done()
					answer(own, op, nil)
					<-busy
				}()
				continue
			}
			s := seq.Add(1)
			if parked.Load() && parked.CompareAndSwap(true, false) {
				select {
				case wake <- struct{}{}:
				default:
				}
			}
			answer(ch, op, fp)
			<-busy
			if !seq.CompareAndSwap(s, s+1) {
				return // the watchdog gave the popping role to a new goroutine meanwhile
			}
		}
	}
	wg.Add(2)
	go loop()
	go func() { // the watchdog
		defer wg.Done()
		tick := time.NewTicker(d.takeover)
		defer tick.Stop()
		quiet := 0
		for {
			s0 := seq.Load()
			select {
			case <-tick.C:
			case <-r.stop:
				return
			}
			s1 := seq.Load()
			switch {
			case s1 != s0: // requests came and went: keep watching
				quiet = 0
			case s1&1 == 1: // one request ran for a whole tick
				quiet = 0
				if seq.CompareAndSwap(s1, s1+1) {
					wg.Add(1)
					go loop()
				}
			case quiet < parkAfter:
				quiet++
			default: // quiet for parkAfter ticks: sleep until the next request
				quiet = 0
				tick.Stop()
				parked.Store(true)
				if seq.Load() == s1 {
					select {
					case <-wake:
					case <-r.stop:
						return
					}
				}
				parked.Store(false)
				tick.Reset(d.takeover)
			}
		}
	}()
	<-r.stop
	wg.Wait() // requests alias guest memory: finish them before the ring goes away
}

// wait waits for the guest's next kick and reports false when the queue stopped. It waits on
// the popper's own thread, woken by the kick directly, in waits of under 10 ms, passing through
// the scheduler every yieldEvery (see loop), and parks in the netpoller (Queue.WaitKickPark)
// once the guest has been quiet for idleAfter.
//
// Why not one wait until the kick: the Go runtime's sysmon takes the P of a goroutine that has
// been in one system call for 10 ms, and once every P is idle it sleeps until the next system
// call wakes it; after either it polls every 20 µs for a millisecond: ~60 wake-ups of its
// thread, on a CPU the guest's vCPU or the VMM may need. A guest sending a request every 10 ms
// or more (1 MiB writes in a TCG guest) paid that on every request (through the harness, 1 MiB
// writes 20 ms apart: 58 sysmon sleeps and 70 context switches per request, C virtiofsd 2.4).
// Waiting in short waits on a thread keeps the P busy in the runtime's eyes, so sysmon neither
// takes it nor sleeps; parking once the guest is quiet lets an idle daemon sleep.
func wait(q *vhostuser.Queue, lastPass *time.Time) bool {
	for start := time.Now(); time.Since(start) < idleAfter; {
		// Wake in time to pass the scheduler before sysmon's 10 ms are up.
		d := min(waitSlice, yieldEvery-time.Since(*lastPass))
		if d < time.Millisecond {
			// Unlocked, the pass costs a wake-up of an idle thread that finds nothing to do;
			// locked, a hand-off of the P to another thread and back (futex calls per pass
			// 5 → 2, measured with the guest quiet).
			runtime.UnlockOSThread()
			runtime.Gosched()
			runtime.LockOSThread()
			*lastPass = time.Now()
			continue
		}
		kicked, err := q.WaitKickThreadFor(d)
		if err != nil {
			return false
		}
		if kicked {
			return true
		}
	}
	err := q.WaitKickPark()
	*lastPass = time.Now()
	if err != nil {
		select {
		case <-q.Stopped():
			return false
		default: // parking failed (no descriptor left to register): wait on the thread
			return q.WaitKickThread() == nil
		}
	}
	return true
}

// waitSlice is how long one wait on the thread lasts at most: well under sysmon's 10 ms.
const waitSlice = 8 * time.Millisecond

// idleAfter is how long a queue waits on its thread before it parks. Its cost: a wake-up every
// waitSlice plus a yield (a thread hand-off and back) every yieldEvery, ~0.7 wake-ups a
// millisecond, against ~60 for a wake from a park; so a guest quiet for less than ~100 ms is
// cheaper to wait for on the thread.
const idleAfter = 100 * time.Millisecond

// yieldEvery is how often the popping goroutine passes through the scheduler (see loop).
const yieldEvery = 8 * time.Millisecond

// takeover is the watchdog's tick: a request still running after one to two ticks gets a new
// popping goroutine for the queue. Each tick wakes the runtime's timer thread and a thread for the
// watchdog, and in a TCG guest's create loop the 10 ms tick was most of the daemon's extra
// wake-ups, pushing the popper onto the guest's vCPU's CPU: at 25 ms, timer wake-ups fell from
// ~165 to ~70 a second, popper migrations from ~265 to ~200 a second, and the vCPU's run per
// request from 131 to 121 µs (C virtiofsd's run: 100 µs, no migrations). A hung request holds
// up the queue for 25–50 ms before the hand-over.
const takeover = 25 * time.Millisecond

// parkAfter is how many quiet ticks the watchdog waits before it parks. Parking after every
// quiet tick made a guest's ordinary pace of requests (one every few hundred µs under TCG) wake
// it, and a thread for it, on nearly every request.
const parkAfter = 4

// handle answers one FUSE request; a panic in the file system (a bug, or a fault on guest memory
// the frontend unmapped) fails the request instead of the daemon.
func handle(s *session, fp *fastPath, ch *vhostuser.Chain, log zerolog.Logger) (n uint32) {
	defer func() {
		if r := recover(); r != nil {
			log.Error().Interface("panic", r).Msg("virtiofs: request handler panicked")
			n = 0
		}
	}()
	k, st := s.handle(fp, ch.Readable, ch.Writable)
	if !st.Ok() {
		log.Debug().Str("status", st.String()).Msg("virtiofs: malformed request")
		return 0
	}
	return uint32(k)
}
