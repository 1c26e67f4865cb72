// Package broker_bench measures the event backbone on this machine: persisted events per second,
// publish→consume latency (p50/p99) and projection speed, for virtkit's broker package and, as
// the peer, plain nats.go JetStream on the same embedded server. bench.sh runs both and prints
// ratios. Everything runs against a real embedded nats-server with a file store in a temp dir.
package broker_bench

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
)

func event(i int) broker.Event {
	return &broker.VMReady{VM: fmt.Sprintf("vm-%d", i%500), IP: "10.77.0.9", BootMillis: int64(i)}
}

// rawStream is the peer's stream: same storage, no dedupe window.
func rawStream(b *testing.B, js jetstream.JetStream) {
	_, err := js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "RAW", Subjects: []string{"raw.>"}, Storage: jetstream.FileStorage})
	if err != nil {
		b.Fatal(err)
	}
}

// payload is what the peer publishes: the same bytes virtkit would store.
func payload(b *testing.B) []byte {
	env, err := broker.NewEnvelope("h1", event(1))
	if err != nil {
		b.Fatal(err)
	}
	data, _ := env.Marshal()
	return data
}

func BenchmarkPersistVirtkit(b *testing.B) {
	_, c := brokertest.Start(b, broker.SchemaOptions{})
	ctx := context.Background()
	envs := make([]*broker.Envelope, b.N)
	for i := range envs {
		envs[i], _ = broker.NewEnvelope(c.Host(), event(i))
	}
	b.ResetTimer()
	start := time.Now()
	for lo := 0; lo < b.N; lo += 1000 {
		batch := c.NewBatch()
		for _, env := range envs[lo:min(lo+1000, b.N)] {
			if err := batch.Add(env); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := batch.Wait(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
}

func BenchmarkPersistRawJetStream(b *testing.B) {
	_, c := brokertest.Start(b, broker.SchemaOptions{})
	js := c.JetStream()
	rawStream(b, js)
	data := payload(b)
	b.ResetTimer()
	start := time.Now()
	for lo := 0; lo < b.N; lo += 1000 {
		futs := make([]jetstream.PubAckFuture, 0, 1000)
		for i := lo; i < min(lo+1000, b.N); i++ {
			f, err := js.PublishAsync(fmt.Sprintf("raw.vm.vm-%d.ready", i%500), data)
			if err != nil {
				b.Fatal(err)
			}
			futs = append(futs, f)
		}
		for _, f := range futs {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
}

func report(b *testing.B, lat []time.Duration) {
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) }
	b.ReportMetric(q(0.50), "p50-µs")
	b.ReportMetric(q(0.99), "p99-µs")
}

// One event at a time: publish (acknowledged, so persisted) until a subscriber has it.
func BenchmarkLatencyVirtkit(b *testing.B) {
	_, c := brokertest.Start(b, broker.SchemaOptions{})
	ctx := context.Background()
	got := make(chan struct{}, 1)
	sub, err := c.Subscribe(ctx, broker.SubscribeOptions{New: true}, func(context.Context, *broker.Envelope, broker.Event) error {
		got <- struct{}{}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Stop()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := c.Publish(ctx, event(i)); err != nil {
			b.Fatal(err)
		}
		<-got
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	report(b, lat)
}

func BenchmarkLatencyRawJetStream(b *testing.B) {
	_, c := brokertest.Start(b, broker.SchemaOptions{})
	js := c.JetStream()
	rawStream(b, js)
	ctx := context.Background()
	cons, err := js.OrderedConsumer(ctx, "RAW", jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverNewPolicy})
	if err != nil {
		b.Fatal(err)
	}
	got := make(chan struct{}, 1)
	cc, err := cons.Consume(func(jetstream.Msg) { got <- struct{}{} })
	if err != nil {
		b.Fatal(err)
	}
	defer cc.Stop()
	data := payload(b)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := js.Publish(ctx, "raw.vm.x.ready", data); err != nil {
			b.Fatal(err)
		}
		<-got
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	report(b, lat)
}

// Core NATS request-free fan-out, not persisted: the floor any persisted path is measured against.
func BenchmarkLatencyCoreNATS(b *testing.B) {
	_, c := brokertest.Start(b, broker.SchemaOptions{})
	nc := c.Conn()
	got := make(chan struct{}, 1)
	sub, err := nc.Subscribe("core.x", func(*nats.Msg) { got <- struct{}{} })
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Unsubscribe()
	nc.Flush()
	data := payload(b)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if err := nc.Publish("core.x", data); err != nil {
			b.Fatal(err)
		}
		<-got
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	report(b, lat)
}

// How fast the projector turns the log into KV rows (each a compare-and-set write).
func BenchmarkProjector(b *testing.B) {
	_, c := brokertest.Start(b, broker.SchemaOptions{})
	ctx := context.Background()
	batch := c.NewBatch()
	for i := 0; i < b.N; i++ {
		env, _ := broker.NewEnvelope(c.Host(), event(i))
		if err := batch.Add(env); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := batch.Wait(ctx); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	start := time.Now()
	pctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- broker.NewProjector(c, zerolog.Nop()).Run(pctx) }()
	for {
		lag, err := broker.ProjectionLag(ctx, c, c.Host())
		if err == nil && lag == 0 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "events/s")
	b.StopTimer()
	stop()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}
