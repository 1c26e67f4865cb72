package broker_test

import (
	"context"
	"errors"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
)

// The daemon (`virtkit serve`, a child process) is SIGKILLed while 10,000 events are being
// published and its projector is applying them. Restarted from the same store, and after the
// publisher retried everything, every event is stored exactly once, in a log that replays to the
// same state as the live KV projection and as the expected fold.
func TestCrashDuringPublishKeepsEveryEventOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds virtkit and runs it as a child process")
	}
	const total = 10000
	ctx := ctxT(t, 5*time.Minute)
	dir := t.TempDir()
	d := brokertest.Serve(t, dir)
	c := d.Connect("publisher")
	envs := envelopes(t, "publisher", genEvents(total, 2026, false))

	// Publish in pipelined batches; crash the daemon once half of them are acknowledged.
	var acked atomic.Int64
	pubDone := make(chan error, 1)
	go func() {
		for start := 0; start < total; start += 250 {
			b := c.NewBatch()
			for _, env := range envs[start:min(start+250, total)] {
				if err := b.Add(env); err != nil {
					pubDone <- err
					return
				}
			}
			wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := b.Wait(wctx)
			cancel()
			if err != nil {
				pubDone <- err
				return
			}
			acked.Add(int64(min(250, total-start)))
		}
		pubDone <- nil
	}()
	for acked.Load() < total/2 {
		select {
		case err := <-pubDone:
			t.Fatalf("publisher finished before the crash: %v", err)
		case <-time.After(time.Millisecond):
		}
	}
	d.Kill()
	before := acked.Load()
	if err := <-pubDone; err == nil {
		t.Log("all publishes were acknowledged before the kill landed")
	}
	c.Close()
	t.Logf("killed the daemon with %d of %d events acknowledged", before, total)
	if _, err := os.Stat(broker.EndpointPath(dir)); err != nil {
		t.Fatalf("a crashed daemon cannot remove its endpoint file, yet: %v", err)
	}

	// Restart on the same store; the stale endpoint file must not stop it.
	d = brokertest.Serve(t, dir)
	c = d.Connect("publisher")
	st, err := c.JetStream().Stream(ctx, broker.EventsStream)
	if err != nil {
		t.Fatal(err)
	}
	survived := countFrom(t, ctx, c, "publisher")
	if int64(len(survived)) < before {
		t.Fatalf("%d events acknowledged before the crash but only %d survived it", before, len(survived))
	}
	t.Logf("after restart: %d publisher events stored (%d msgs in stream)", len(survived), st.CachedInfo().State.Msgs)

	// The publisher retries everything: what is stored is deduplicated.
	dups := publishAll(t, ctx, c, envs)
	if dups != len(survived) {
		t.Errorf("retry of all %d events: %d duplicates, want %d (the ones that survived)", total, dups, len(survived))
	}
	stored := countFrom(t, ctx, c, "publisher")
	if len(stored) != total {
		t.Errorf("%d distinct publisher events stored, want %d", len(stored), total)
	}
	for _, env := range envs {
		if n := stored[env.ID]; n != 1 {
			t.Fatalf("event %s stored %d times", env.ID, n)
		}
	}

	// Live projection (the restarted daemon's projector resumed where it was killed) equals the
	// replay of the log and the expected fold.
	waitProjected(t, ctx, c, "testhost")
	want := fold(t, envs)
	live, err := broker.ReadProjection(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	replay, err := broker.Replay(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	diffStates(t, "replay vs expected", want, replay, false)
	diffStates(t, "live vs replay", replay, live, false)
	if h := live.Hosts["testhost"]; h == nil || h.Stopped {
		t.Errorf("the daemon's host is not live in vk_hosts: %+v", h)
	}

	// A graceful stop: exit 0, endpoint removed, host marked stopped.
	if err := d.Stop(time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(broker.EndpointPath(dir)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("endpoint file after a clean stop: %v", err)
	}
}

// countFrom counts stored events per envelope id, for envelopes from source.
func countFrom(t *testing.T, ctx context.Context, c *broker.Client, source string) map[string]int {
	t.Helper()
	out := map[string]int{}
	st, err := c.JetStream().Stream(ctx, broker.EventsStream)
	if err != nil {
		t.Fatal(err)
	}
	if st.CachedInfo().State.Msgs == 0 {
		return out
	}
	cons, err := c.JetStream().OrderedConsumer(ctx, broker.EventsStream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	last := st.CachedInfo().State.LastSeq
	it, err := cons.Messages()
	if err != nil {
		t.Fatal(err)
	}
	defer it.Stop()
	for {
		msg, err := it.Next()
		if err != nil {
			t.Fatal(err)
		}
		env, err := broker.DecodeEnvelope(msg.Data(), msg.Subject())
		if err != nil {
			t.Fatalf("stored event unreadable after the crash: %v", err)
		}
		if env.Source == source {
			out[env.ID]++
		}
		md, _ := msg.Metadata()
		if md.Sequence.Stream >= last {
			return out
		}
	}
}
