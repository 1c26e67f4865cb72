// Package workers runs virtkit's long-lived workers (projector, heartbeat, launcher, converter, CI
// job runner) under one Supervisor, the way `virtkit serve` and the one-shot embedded mode do.
//
// A Worker is anything with a Name and a Run(ctx) that returns when ctx ends, after draining its
// work. The Supervisor owns one goroutine per worker and stops them in the reverse order they
// were added, one after the other. A worker that fails is restarted with
// exponential back-off; one that fails MaxRestarts times within RestartWindow, or returns an error
// wrapped with Fatal, stops the whole supervisor (every other worker is asked to drain) and Run
// returns that error. A worker that returns nil before ctx ends is finished and is not restarted.
//
// Concurrency: Add before Run; Status may be called from any goroutine at any time.
package workers

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/broker"
)

// Worker is one long-running part of the daemon. Run must return when ctx ends, after it has
// finished or handed back the work it took (drain, never drop).
type Worker interface {
	Name() string
	Run(ctx context.Context) error
}

// Worker states as Status reports them.
const (
	StateStarting   = "starting"
	StateRunning    = "running"
	StateRestarting = "restarting"
	StateStopped    = "stopped"
	StateFailed     = "failed"
)

type fatal struct{ err error }

func (f *fatal) Error() string { return f.err.Error() }
func (f *fatal) Unwrap() error { return f.err }

// Fatal marks an error that restarting cannot fix (bad configuration): the supervisor stops.
func Fatal(err error) error {
	if err == nil {
		return nil
	}
	return &fatal{err}
}

// ErrGaveUp is wrapped by Run's error when a worker kept failing.
var ErrGaveUp = errors.New("workers: gave up restarting")

// Config tunes a Supervisor; the zero value is usable.
type Config struct {
	// Log, with the zero logger discarding.
	Log zerolog.Logger
	// MaxRestarts within RestartWindow before giving up; default 5 in 1 minute.
	MaxRestarts   int
	RestartWindow time.Duration
	// Back-off between restarts doubles from MinBackoff to MaxBackoff; default 500ms to 30s.
	MinBackoff, MaxBackoff time.Duration
	// StopTimeout bounds how long Run waits for workers to drain once ctx ends; default 2 minutes.
	StopTimeout time.Duration
}

// Supervisor runs workers. See the package comment.
type Supervisor struct {
	cfg     Config
	mu      sync.Mutex
	entries []*entry
	running bool
}

type entry struct {
	w        Worker
	state    string
	restarts int
	since    time.Time
	lastErr  string
}

// New returns a supervisor with no workers.
func New(cfg Config) *Supervisor {
	if cfg.MaxRestarts == 0 {
		cfg.MaxRestarts = 5
	}
	if cfg.RestartWindow == 0 {
		cfg.RestartWindow = time.Minute
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = 500 * time.Millisecond
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 30 * time.Second
	}
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 2 * time.Minute
	}
	return &Supervisor{cfg: cfg}
}

// Add registers workers; it panics after Run started or on a duplicate name.
func (s *Supervisor) Add(ws ...Worker) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running {
		panic("workers: Add after Run")
	}
	for _, w := range ws {
		for _, e := range s.entries {
			if e.w.Name() == w.Name() {
				panic(fmt.Sprintf("workers: two workers named %q", w.Name()))
			}
		}
		s.entries = append(s.entries, &entry{w: w, state: StateStarting, since: time.Now()})
	}
}

// Status is a snapshot of every worker.
func (s *Supervisor) Status() []broker.WorkerStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]broker.WorkerStatus, len(s.entries))
	for i, e := range s.entries {
		out[i] = broker.WorkerStatus{Name: e.w.Name(), State: e.state, Restarts: e.restarts, Since: e.since.UTC(), Error: e.lastErr}
	}
	return out
}

func (s *Supervisor) set(e *entry, state string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e.state, e.since = state, time.Now()
	if err != nil {
		e.lastErr = err.Error()
	}
}

// Run runs every worker until ctx ends (then stops them, at most StopTimeout in all) or until
// one fails for good. Workers are stopped one at a time in the reverse order they were added, each
// drained before the next is asked to stop: a worker added early (the projector) still runs while
// later ones (launcher, converter) finish their work and publish their last events. Run returns
// nil after a clean stop.
func (s *Supervisor) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.running {
		s.mu.Unlock()
		return errors.New("workers: Run called twice")
	}
	s.running = true
	entries := append([]*entry(nil), s.entries...)
	s.mu.Unlock()

	type running struct {
		cancel context.CancelFunc
		done   chan struct{}
	}
	stop, stopAll := context.WithCancel(ctx)
	defer stopAll()
	var (
		errMu    sync.Mutex
		firstErr error
		all      sync.WaitGroup
	)
	rs := make([]running, len(entries))
	for i, e := range entries {
		wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		rs[i] = running{cancel, make(chan struct{})}
		all.Add(1)
		go func() {
			defer all.Done()
			defer close(rs[i].done)
			if err := s.supervise(wctx, e); err != nil {
				errMu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				errMu.Unlock()
				stopAll()
			}
		}()
	}
	allDone := make(chan struct{})
	go func() { all.Wait(); close(allDone) }()
	select {
	case <-stop.Done():
	case <-allDone:
	}
	t := time.NewTimer(s.cfg.StopTimeout)
	defer t.Stop()
	var stuck []string
	for i := len(rs) - 1; i >= 0; i-- {
		rs[i].cancel()
		if stuck != nil {
			continue // out of time: cancel the rest without waiting
		}
		select {
		case <-rs[i].done:
		case <-t.C:
			stuck = append(stuck, entries[i].w.Name())
		}
	}
	errMu.Lock()
	defer errMu.Unlock()
	if stuck != nil {
		// Name every worker still running, not just the one the clock ran out on.
		stuck = stuck[:0]
		for i, r := range rs {
			select {
			case <-r.done:
			default:
				stuck = append(stuck, entries[i].w.Name())
			}
		}
		return errors.Join(firstErr, fmt.Errorf("workers: %v did not stop within %v", stuck, s.cfg.StopTimeout))
	}
	return firstErr
}

// supervise runs one worker with restarts.
func (s *Supervisor) supervise(ctx context.Context, e *entry) error {
	name := e.w.Name()
	log := s.cfg.Log.With().Str("worker", name).Logger()
	var failures []time.Time
	backoff := s.cfg.MinBackoff
	for {
		s.set(e, StateRunning, nil)
		start := time.Now()
		err := runWorker(ctx, e.w)
		if ctx.Err() != nil {
			if err != nil && !errors.Is(err, context.Canceled) {
				log.Warn().Err(err).Msg("worker stopped with an error")
			}
			s.set(e, StateStopped, nil)
			return nil
		}
		if err == nil {
			log.Info().Msg("worker finished")
			s.set(e, StateStopped, nil)
			return nil
		}
		var f *fatal
		if errors.As(err, &f) {
			log.Error().Err(err).Msg("worker failed fatally")
			s.set(e, StateFailed, err)
			return fmt.Errorf("workers: %s: %w", name, err)
		}
		now := time.Now()
		if now.Sub(start) > s.cfg.RestartWindow {
			backoff = s.cfg.MinBackoff // it ran fine for a while: start the back-off over
		}
		kept := failures[:0]
		for _, t := range failures {
			if now.Sub(t) < s.cfg.RestartWindow {
				kept = append(kept, t)
			}
		}
		failures = append(kept, now)
		if len(failures) > s.cfg.MaxRestarts {
			log.Error().Err(err).Int("failures", len(failures)).Msg("worker keeps failing; giving up")
			s.set(e, StateFailed, err)
			return fmt.Errorf("%w %s after %d failures in %v: %w", ErrGaveUp, name, len(failures), s.cfg.RestartWindow, err)
		}
		log.Warn().Err(err).Dur("restart_in", backoff).Msg("worker failed; restarting")
		s.mu.Lock()
		e.restarts++
		s.mu.Unlock()
		s.set(e, StateRestarting, err)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			s.set(e, StateStopped, nil)
			return nil
		}
		backoff = min(backoff*2, s.cfg.MaxBackoff)
	}
}

func runWorker(ctx context.Context, w Worker) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v", r)
		}
	}()
	return w.Run(ctx)
}
