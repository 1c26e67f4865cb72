// Package reaper starts child processes and collects their exit statuses, including — when the
// process is PID 1 or a subreaper — the statuses of orphans re-parented to it, which would
// otherwise stay zombies forever.
//
// Reaping every child with wait4(-1) races with os/exec's own Wait, so processes that must be
// reaped this way are started through Reaper.Start, never waited on with exec.Cmd.Wait. A mutex
// is held from fork until the child is registered, so the reaper can never collect a status
// before its owner is known.
//
// Concurrency: all methods are safe for concurrent use. Run owns the only reaping goroutine.
package reaper

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Status is how a child ended.
type Status struct {
	Code   int // exit code, or 128+Signal
	Signal int // killing signal, 0 if it exited
}

func statusOf(ws unix.WaitStatus) Status {
	if ws.Signaled() {
		return Status{Code: 128 + int(ws.Signal()), Signal: int(ws.Signal())}
	}
	return Status{Code: ws.ExitStatus()}
}

// Reaper owns child processes. The zero value is not usable; call New.
type Reaper struct {
	orphans bool

	mu      sync.Mutex // held across fork+register and across each reaping pass
	waiting map[int]*Proc
	orphanN int

	sigc chan os.Signal
	done chan struct{}
	wg   sync.WaitGroup
}

// New returns a Reaper. With orphans true it collects every child (use it as PID 1 or a
// subreaper); otherwise it only waits for the processes it started, leaving other children of the
// process (e.g. those of a test binary) alone.
func New(orphans bool) *Reaper {
	r := &Reaper{
		orphans: orphans,
		waiting: map[int]*Proc{},
		sigc:    make(chan os.Signal, 8),
		done:    make(chan struct{}),
	}
	signal.Notify(r.sigc, syscall.SIGCHLD)
	r.wg.Add(1)
	go r.loop()
	return r
}

// Close stops reaping. Processes started before keep running; their Wait never returns.
func (r *Reaper) Close() {
	signal.Stop(r.sigc)
	select {
	case <-r.done:
	default:
		close(r.done)
	}
	r.wg.Wait()
}

// Orphans is the number of processes reaped that nobody started through this Reaper.
func (r *Reaper) Orphans() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.orphanN
}

// Proc is a started child.
type Proc struct {
	Pid  int
	done chan struct{}
	st   Status
}

// Wait blocks until the process ends and returns its status. It may be called many times.
func (p *Proc) Wait() Status {
	<-p.done
	return p.st
}

// Done is closed when the process has ended.
func (p *Proc) Done() <-chan struct{} { return p.done }

func (p *Proc) finish(st Status) {
	p.st = st
	close(p.done)
}

// Start starts cmd, which must not use exec.Cmd pipes or non-*os.File stdio (nothing would copy
// them), and must never be Waited on.
func (r *Reaper) Start(cmd *exec.Cmd) (*Proc, error) {
	for _, f := range []any{cmd.Stdin, cmd.Stdout, cmd.Stderr} {
		if f == nil {
			continue
		}
		if _, ok := f.(*os.File); !ok {
			return nil, errors.New("reaper: start: stdio must be *os.File or nil")
		}
	}
	r.mu.Lock()
	err := cmd.Start()
	if err != nil {
		r.mu.Unlock()
		return nil, err
	}
	pid := cmd.Process.Pid
	p := &Proc{Pid: pid, done: make(chan struct{})}
	r.waiting[pid] = p
	r.mu.Unlock()
	// The status comes from wait4; the pidfd os.Process holds is not needed any more.
	cmd.Process.Release()
	// Catch a SIGCHLD that arrived while the lock was held.
	select {
	case r.sigc <- syscall.SIGCHLD:
	default:
	}
	return p, nil
}

func (r *Reaper) loop() {
	defer r.wg.Done()
	for {
		select {
		case <-r.done:
			return
		case <-r.sigc:
			r.reap()
		}
	}
}

// reap collects every status available now.
func (r *Reaper) reap() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.orphans {
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err == unix.EINTR {
				continue
			}
			if err != nil || pid <= 0 {
				return
			}
			if !ws.Exited() && !ws.Signaled() {
				continue
			}
			r.deliver(pid, ws)
		}
	}
	for pid := range r.waiting {
		var ws unix.WaitStatus
		got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		for err == unix.EINTR {
			got, err = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		}
		if err == unix.ECHILD {
			// Someone else reaped it; report it as lost rather than hang its owner.
			r.waiting[pid].finish(Status{Code: 255})
			delete(r.waiting, pid)
			continue
		}
		if err != nil || got != pid || (!ws.Exited() && !ws.Signaled()) {
			continue
		}
		r.deliver(pid, ws)
	}
}

func (r *Reaper) deliver(pid int, ws unix.WaitStatus) {
	p, ok := r.waiting[pid]
	if !ok {
		r.orphanN++
		return
	}
	delete(r.waiting, pid)
	p.finish(statusOf(ws))
}

// String describes a status for logs.
func (s Status) String() string {
	if s.Signal != 0 {
		return fmt.Sprintf("killed by signal %d (%s)", s.Signal, unix.SignalName(syscall.Signal(s.Signal)))
	}
	return fmt.Sprintf("exit code %d", s.Code)
}
