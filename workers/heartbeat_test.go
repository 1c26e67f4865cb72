package workers_test

import (
	"context"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
	"github.com/virtkit/virtkit/workers"
)

// A supervised heartbeat and projector put the host, its capacity and its workers in vk_hosts;
// a clean stop marks it stopped.
func TestHeartbeatShowsHostAndWorkers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	slots := broker.NewSlots(6)
	s := workers.New(workers.Config{Log: zerolog.Nop()})
	s.Add(broker.NewProjector(c, zerolog.Nop()))
	s.Add(workers.NewHeartbeat(c, workers.HeartbeatConfig{Supervisor: s, Slots: slots, Version: "v-test", Interval: 100 * time.Millisecond}))
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Run(wctx) }()

	host := func() *broker.Host {
		st, err := broker.ReadProjection(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		return st.Hosts["h1"]
	}
	for {
		h := host()
		if h != nil && len(h.Workers) == 2 && h.Workers[0].State == workers.StateRunning && h.Workers[1].State == workers.StateRunning {
			if h.Capacity != 6 || h.Version != "v-test" || h.Stopped || h.TTL != broker.Duration(30*time.Second) {
				t.Errorf("host row %+v", h)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("host never showed up with running workers: %+v", h)
		case <-time.After(50 * time.Millisecond):
		}
	}
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The heartbeat stopped first and said goodbye; the projector, stopped last, caught up with it.
	if h := host(); h == nil || !h.Stopped {
		t.Errorf("host not marked stopped after a clean stop: %+v", h)
	}
}
