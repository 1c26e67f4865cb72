package workers_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/workers"
)

// fn is a Worker made of a function.
type fn struct {
	name string
	run  func(ctx context.Context) error
}

func (f fn) Name() string                  { return f.name }
func (f fn) Run(ctx context.Context) error { return f.run(ctx) }

func quick() workers.Config {
	return workers.Config{Log: zerolog.Nop(), MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, MaxRestarts: 3, RestartWindow: time.Minute}
}

func TestRestartsThenGivesUp(t *testing.T) {
	var runs, otherStopped atomic.Int32
	s := workers.New(quick())
	boom := errors.New("boom")
	s.Add(fn{"flaky", func(ctx context.Context) error { runs.Add(1); return boom }})
	s.Add(fn{"steady", func(ctx context.Context) error { <-ctx.Done(); otherStopped.Add(1); return nil }})
	err := s.Run(context.Background())
	if !errors.Is(err, workers.ErrGaveUp) || !errors.Is(err, boom) || !strings.Contains(err.Error(), "flaky") {
		t.Fatalf("Run = %v, want ErrGaveUp wrapping boom naming flaky", err)
	}
	if n := runs.Load(); n != 4 {
		t.Errorf("flaky ran %d times, want 4 (1 + 3 restarts)", n)
	}
	if otherStopped.Load() != 1 {
		t.Error("the other worker was not stopped when the supervisor gave up")
	}
	st := s.Status()
	if st[0].State != workers.StateFailed || st[0].Restarts != 3 || st[0].Error != "boom" {
		t.Errorf("flaky status %+v", st[0])
	}
	if st[1].State != workers.StateStopped {
		t.Errorf("steady status %+v", st[1])
	}
}

func TestRecoversAfterTransientFailure(t *testing.T) {
	var runs atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	s := workers.New(quick())
	s.Add(fn{"once", func(ctx context.Context) error {
		if runs.Add(1) == 1 {
			panic("first run panics")
		}
		<-ctx.Done()
		return nil
	}})
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for s.Status()[0].State != workers.StateRunning || runs.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("worker not running again: %+v", s.Status())
		}
		time.Sleep(time.Millisecond)
	}
	if st := s.Status()[0]; st.Restarts != 1 || !strings.Contains(st.Error, "first run panics") {
		t.Errorf("status after a panic %+v", st)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("clean stop: %v", err)
	}
}

func TestFatalStopsAtOnce(t *testing.T) {
	var runs atomic.Int32
	s := workers.New(quick())
	s.Add(fn{"misconfigured", func(ctx context.Context) error { runs.Add(1); return workers.Fatal(errors.New("bad config")) }})
	err := s.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "bad config") || errors.Is(err, workers.ErrGaveUp) {
		t.Fatalf("Run = %v", err)
	}
	if runs.Load() != 1 {
		t.Errorf("a fatal worker was restarted (%d runs)", runs.Load())
	}
}

// Shutdown waits for every worker to finish draining, and reports one that will not stop.
func TestShutdownDrainsAndBoundsTheWait(t *testing.T) {
	var drained atomic.Bool
	ctx, cancel := context.WithCancel(context.Background())
	s := workers.New(quick())
	s.Add(fn{"drainer", func(ctx context.Context) error {
		<-ctx.Done()
		time.Sleep(200 * time.Millisecond) // finishing in-flight work
		drained.Store(true)
		return nil
	}})
	s.Add(fn{"done-early", func(ctx context.Context) error { return nil }})
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	if err := s.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if !drained.Load() {
		t.Error("Run returned before the worker drained")
	}

	cfg := quick()
	cfg.StopTimeout = 100 * time.Millisecond
	s = workers.New(cfg)
	release := make(chan struct{})
	defer close(release)
	s.Add(fn{"stuck", func(ctx context.Context) error { <-release; return nil }})
	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	if err := s.Run(ctx); err == nil || !strings.Contains(err.Error(), "stuck") {
		t.Errorf("Run with a stuck worker = %v", err)
	}
}

func TestAddRejectsDuplicates(t *testing.T) {
	s := workers.New(quick())
	s.Add(fn{"a", nil})
	defer func() {
		if recover() == nil {
			t.Error("duplicate name accepted")
		}
	}()
	s.Add(fn{"a", nil})
}

// Workers stop one at a time, last added first: an early worker still runs while a later one
// drains.
func TestStopsInReverseOrder(t *testing.T) {
	var order []string
	var mu = make(chan struct{}, 1)
	record := func(n string) { mu <- struct{}{}; order = append(order, n); <-mu }
	var laterDrained atomic.Bool
	ctx, cancel := context.WithCancel(context.Background())
	s := workers.New(quick())
	s.Add(fn{"projector", func(ctx context.Context) error {
		<-ctx.Done()
		if !laterDrained.Load() {
			t.Error("projector was stopped before the launcher finished draining")
		}
		record("projector")
		return nil
	}})
	s.Add(fn{"launcher", func(ctx context.Context) error {
		<-ctx.Done()
		time.Sleep(100 * time.Millisecond) // publishing its last events
		laterDrained.Store(true)
		record("launcher")
		return nil
	}})
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	if err := s.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if strings.Join(order, ",") != "launcher,projector" {
		t.Errorf("stop order %v", order)
	}
}
