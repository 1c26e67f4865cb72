package broker_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
)

type job struct {
	N int `json:"n"`
}

func queued(t *testing.T, ctx context.Context, c *broker.Client) uint64 {
	t.Helper()
	st, err := c.JetStream().Stream(ctx, broker.WorkStream)
	if err != nil {
		t.Fatal(err)
	}
	return st.CachedInfo().State.Msgs
}

func waitFor(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Work is taken only up to free capacity, acked when done, and gone from the queue afterwards.
func TestWorkFollowsCapacity(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	const items = 30
	for i := 0; i < items; i++ {
		if _, err := c.Submit(ctx, broker.WorkCIJob, fmt.Sprint("job-", i), job{i}); err != nil {
			t.Fatal(err)
		}
	}
	slots := broker.NewSlots(3)
	var running, peak, done atomic.Int32
	seen := sync.Map{}
	h := func(ctx context.Context, w *broker.Work) error {
		var j job
		if err := w.Decode(&j); err != nil {
			return err
		}
		if _, dup := seen.LoadOrStore(j.N, true); dup {
			t.Errorf("item %d handled twice", j.N)
		}
		n := running.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(10 * time.Millisecond)
		running.Add(-1)
		done.Add(1)
		return nil
	}
	wc, err := c.ConsumeWork(ctx, broker.WorkOptions{Subject: broker.WorkCIJob, Slots: slots}, h)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "all items", func() bool { return done.Load() == items })
	waitFor(t, ctx, "queue empty", func() bool { return queued(t, ctx, c) == 0 })
	if p := peak.Load(); p > 3 || p < 2 {
		t.Errorf("peak concurrency %d, want 2..3 (capacity 3)", p)
	}
	// Lower capacity to 1: from now on one at a time.
	slots.SetCapacity(1)
	peak.Store(0)
	for i := items; i < items+10; i++ {
		if _, err := c.Submit(ctx, broker.WorkCIJob, fmt.Sprint("job-", i), job{i}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, ctx, "second round", func() bool { return done.Load() == items+10 })
	if p := peak.Load(); p != 1 {
		t.Errorf("peak concurrency %d after SetCapacity(1)", p)
	}
	wc.Drain()
	<-wc.Closed()
	if slots.InUse() != 0 {
		t.Errorf("%d slots still in use after drain", slots.InUse())
	}
}

// A transient failure is retried; a permanent one is dropped; a bad body is permanent.
func TestWorkRetryAndPermanent(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	var mu sync.Mutex
	attempts := map[string][]int{}
	h := func(ctx context.Context, w *broker.Work) error {
		mu.Lock()
		attempts[w.ID] = append(attempts[w.ID], w.Attempt)
		mu.Unlock()
		switch w.ID {
		case "flaky":
			if w.Attempt == 1 {
				return errors.New("transient")
			}
			return nil
		case "bad":
			return broker.Permanent(errors.New("no such image"))
		case "garbage":
			var j job
			return w.Decode(&j)
		}
		return nil
	}
	wc, err := c.ConsumeWork(ctx, broker.WorkOptions{Subject: broker.WorkImageConvert, Slots: broker.NewSlots(2)}, h)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { wc.Stop(); <-wc.Closed() }()
	for _, id := range []string{"flaky", "bad"} {
		if _, err := c.Submit(ctx, broker.WorkImageConvert, id, job{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Submit(ctx, broker.WorkImageConvert, "garbage", "not an object"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "queue empty", func() bool { return queued(t, ctx, c) == 0 })
	time.Sleep(3 * time.Second) // a wrongly retried permanent failure would show up by now
	mu.Lock()
	defer mu.Unlock()
	if got := attempts["flaky"]; len(got) != 2 || got[0] != 1 || got[1] != 2 {
		t.Errorf("flaky attempts %v, want [1 2]", got)
	}
	for _, id := range []string{"bad", "garbage"} {
		if got := attempts[id]; len(got) != 1 {
			t.Errorf("%s attempts %v, want one", id, got)
		}
	}
}

// A host that dies holding work (connection gone, no ack) loses it to another host after AckWait.
func TestWorkRedeliveredWhenHostDies(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	srv, _ := brokertest.Start(t, broker.SchemaOptions{WorkAckWait: 2 * time.Second})
	hostA := brokertest.Connect(t, srv.ClientConfig(), "hostA")
	hostB := brokertest.Connect(t, srv.ClientConfig(), "hostB")
	if _, err := hostB.Submit(ctx, broker.WorkVMLaunch, "vm-1", job{1}); err != nil {
		t.Fatal(err)
	}
	taken := make(chan struct{})
	release := make(chan struct{})
	wcA, err := hostA.ConsumeWork(ctx, broker.WorkOptions{Subject: broker.WorkVMLaunch, Slots: broker.NewSlots(1)},
		func(ctx context.Context, w *broker.Work) error {
			close(taken)
			<-release // hung, then its host vanishes
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	<-taken
	hostA.Close() // the host dies: no ack, no progress reports
	got := make(chan *broker.Work, 1)
	wcB, err := hostB.ConsumeWork(ctx, broker.WorkOptions{Subject: broker.WorkVMLaunch, Slots: broker.NewSlots(1)},
		func(ctx context.Context, w *broker.Work) error { got <- w; return nil })
	if err != nil {
		t.Fatal(err)
	}
	select {
	case w := <-got:
		if w.ID != "vm-1" || w.Attempt != 2 || w.Source != "hostB" {
			t.Errorf("redelivered %s attempt %d from %s", w.ID, w.Attempt, w.Source)
		}
	case <-ctx.Done():
		t.Fatal("work of the dead host was never redelivered")
	}
	close(release)
	wcA.Stop()
	<-wcA.Closed()
	wcB.Drain()
	<-wcB.Closed()
	waitFor(t, ctx, "queue empty", func() bool { return queued(t, ctx, hostB) == 0 })
}

// Long-running work on a live host is not redelivered: progress reports keep it.
func TestWorkLongerThanAckWaitStaysWithLiveHost(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{WorkAckWait: time.Second})
	if _, err := c.Submit(ctx, broker.WorkVMLaunch, "slow", job{}); err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	wc, err := c.ConsumeWork(ctx, broker.WorkOptions{Subject: broker.WorkVMLaunch, Slots: broker.NewSlots(4)},
		func(ctx context.Context, w *broker.Work) error {
			calls.Add(1)
			time.Sleep(4 * time.Second)
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "queue empty", func() bool { return queued(t, ctx, c) == 0 })
	wc.Drain()
	<-wc.Closed()
	if n := calls.Load(); n != 1 {
		t.Errorf("handler ran %d times, want 1", n)
	}
}

// Drain lets in-flight work finish and ack; work that outlives Grace is handed back, not acked.
func TestWorkDrainOnShutdown(t *testing.T) {
	ctx := ctxT(t, 2*time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	for _, id := range []string{"quick", "stuck"} {
		if _, err := c.Submit(ctx, broker.WorkCIJob, id, job{}); err != nil {
			t.Fatal(err)
		}
	}
	var started sync.WaitGroup
	started.Add(2)
	var quickDone atomic.Bool
	wctx, stop := context.WithCancel(ctx)
	wc, err := c.ConsumeWork(wctx, broker.WorkOptions{Subject: broker.WorkCIJob, Slots: broker.NewSlots(2), Grace: 2 * time.Second},
		func(ctx context.Context, w *broker.Work) error {
			started.Done()
			if w.ID == "quick" {
				time.Sleep(500 * time.Millisecond) // finishes inside the grace period
				quickDone.Store(true)
				return nil
			}
			<-ctx.Done() // only ends when canceled after the grace period
			return ctx.Err()
		})
	if err != nil {
		t.Fatal(err)
	}
	started.Wait()
	stop() // SIGTERM
	select {
	case <-wc.Closed():
	case <-time.After(20 * time.Second):
		t.Fatal("consumer did not close after drain")
	}
	if !quickDone.Load() {
		t.Error("in-flight work was not allowed to finish")
	}
	// "stuck" was handed back at once (Nak), so another host gets it right away.
	got := make(chan string, 2)
	wc2, err := c.ConsumeWork(ctx, broker.WorkOptions{Subject: broker.WorkCIJob, Slots: broker.NewSlots(2)},
		func(ctx context.Context, w *broker.Work) error { got <- w.ID; return nil })
	if err != nil {
		t.Fatal(err)
	}
	defer func() { wc2.Drain(); <-wc2.Closed() }()
	select {
	case id := <-got:
		if id != "stuck" {
			t.Errorf("redelivered %q, want stuck", id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("interrupted work was not handed back")
	}
	select {
	case id := <-got:
		t.Errorf("%q delivered again although it was acked", id)
	case <-time.After(time.Second):
	}
}

// Host-specific work: its consumer is created on demand and sees only that host's items.
func TestHostWork(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	if _, err := c.Submit(ctx, broker.HostWorkSubject("h2", "vm.stop"), "stop-1", job{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Submit(ctx, broker.HostWorkSubject("h1", "vm.stop"), "stop-2", job{}); err != nil {
		t.Fatal(err)
	}
	got := make(chan *broker.Work, 2)
	wc, err := c.ConsumeWork(ctx, broker.WorkOptions{Subject: broker.HostWorkSubject("h1", ">"), Slots: broker.NewSlots(1)},
		func(ctx context.Context, w *broker.Work) error { got <- w; return nil })
	if err != nil {
		t.Fatal(err)
	}
	defer func() { wc.Drain(); <-wc.Closed() }()
	select {
	case w := <-got:
		if w.ID != "stop-2" || w.Subject != "vk.work.host.h1.vm.stop" {
			t.Errorf("got %s on %s", w.ID, w.Subject)
		}
	case <-ctx.Done():
		t.Fatal("host work not delivered")
	}
	if name := broker.WorkConsumerName(broker.HostWorkSubject("h1", ">")); name != "work-host-h1" {
		t.Errorf("consumer name %q", name)
	}
	if _, err := c.Submit(ctx, "vk.evt.x", "id", job{}); err == nil {
		t.Error("submit outside vk.work accepted")
	}
}
