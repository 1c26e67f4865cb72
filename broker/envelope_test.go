package broker_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/virtkit/virtkit/broker"
)

func TestDecodeEnvelopeErrors(t *testing.T) {
	good, err := broker.NewEnvelope("h1", &broker.VMStopped{VM: "v1", ExitCode: 3})
	if err != nil {
		t.Fatal(err)
	}
	mutate := func(f func(m map[string]any)) []byte {
		b, _ := good.Marshal()
		var m map[string]any
		json.Unmarshal(b, &m)
		f(m)
		b, _ = json.Marshal(m)
		return b
	}
	for _, tc := range []struct {
		name    string
		data    []byte
		subject string
		want    string
	}{
		{"not json", []byte("{"), "", "unexpected end"},
		{"spec", mutate(func(m map[string]any) { m["specversion"] = "0.3" }), "", "specversion"},
		{"no id", mutate(func(m map[string]any) { delete(m, "id") }), "", "id"},
		{"no source", mutate(func(m map[string]any) { m["source"] = "" }), "", "source"},
		{"no time", mutate(func(m map[string]any) { delete(m, "time") }), "", "time"},
		{"bad type", mutate(func(m map[string]any) { m["type"] = "vmstopped" }), "", "<aggregate>.<name>"},
		{"bad subject", mutate(func(m map[string]any) { m["subject"] = "a.b" }), "", "subject"},
		{"wrong nats subject", mustMarshal(good), "vk.evt.vm.other.stopped", "belongs on"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := broker.DecodeEnvelope(tc.data, tc.subject)
			if !errors.Is(err, broker.ErrBadEnvelope) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want ErrBadEnvelope mentioning %q", err, tc.want)
			}
		})
	}
	env, err := broker.DecodeEnvelope(mustMarshal(good), "vk.evt.vm.v1.stopped")
	if err != nil {
		t.Fatal(err)
	}
	ev, err := env.Event()
	if err != nil {
		t.Fatal(err)
	}
	if s, ok := ev.(*broker.VMStopped); !ok || s.ExitCode != 3 {
		t.Errorf("event %#v", ev)
	}
	// Unknown types and newer body versions are reported, not guessed.
	env.Type = "vm.teleported"
	if _, err := env.Event(); !errors.Is(err, broker.ErrUnknownEventType) {
		t.Errorf("unknown type: %v", err)
	}
	env.Type, env.DataVersion = "vm.stopped", 2
	if _, err := env.Event(); !errors.Is(err, broker.ErrBadEnvelope) {
		t.Errorf("future version: %v", err)
	}
	env.DataVersion, env.Subject = 1, "v2"
	if _, err := env.Event(); !errors.Is(err, broker.ErrBadEnvelope) {
		t.Errorf("body about another VM: %v", err)
	}
}

func mustMarshal(e *broker.Envelope) []byte {
	b, err := e.Marshal()
	if err != nil {
		panic(err)
	}
	return b
}

// FuzzDecodeEnvelope: any bytes give an envelope or an error, never a panic; an accepted
// envelope survives a re-encode unchanged.
func FuzzDecodeEnvelope(f *testing.F) {
	for _, ev := range []broker.Event{
		&broker.VMStarting{VM: "web1", Host: "h", Image: "alpine", CPUs: 2, MemoryMiB: 512},
		&broker.JobFailed{Job: "j-9", ExitCode: 2, System: true},
		&broker.HostHeartbeat{Host: "h", Capacity: 4, TTL: broker.Duration(30 * time.Second), Workers: []broker.WorkerStatus{{Name: "projector", State: "running"}}},
		&broker.ImageConverted{Image: "i", Ref: "r", SizeBytes: 9},
	} {
		env, _ := broker.NewEnvelope("host-a", ev)
		f.Add(mustMarshal(env), env.NATSSubject())
	}
	f.Add([]byte(`{"specversion":"1.0","id":"x","type":"vm.ready","source":"s","subject":"v","time":"2026-01-01T00:00:00Z","dataversion":1,"data":{"vm":"v"}}`), "")
	f.Add([]byte(`{"specversion":"1.0","id":"x","type":"host.heartbeat","source":"s","subject":"h","time":"2026-01-01T00:00:00Z","dataversion":1,"data":{"host":"h","ttl":"bogus"}}`), "")
	f.Add([]byte(`null`), "")
	f.Add([]byte(`{"data":null}`), "vk.evt.")
	f.Fuzz(func(t *testing.T, data []byte, subject string) {
		env, err := broker.DecodeEnvelope(data, subject)
		if err != nil {
			if !errors.Is(err, broker.ErrBadEnvelope) {
				t.Fatalf("error not ErrBadEnvelope: %v", err)
			}
			return
		}
		if subject != "" && env.NATSSubject() != subject {
			t.Fatalf("accepted %q on subject %q", env.NATSSubject(), subject)
		}
		ev, err := env.Event()
		if err != nil {
			if !errors.Is(err, broker.ErrBadEnvelope) && !errors.Is(err, broker.ErrUnknownEventType) {
				t.Fatalf("Event error of the wrong kind: %v", err)
			}
			return
		}
		if ev.EventSubject() != env.Subject {
			t.Fatalf("body about %q, envelope %q", ev.EventSubject(), env.Subject)
		}
		again, err := broker.DecodeEnvelope(mustMarshal(env), env.NATSSubject())
		if err != nil {
			t.Fatalf("re-encoded envelope rejected: %v", err)
		}
		if again.ID != env.ID || again.Type != env.Type || !again.Time.Equal(env.Time) {
			t.Fatalf("round trip changed the envelope: %+v vs %+v", again, env)
		}
		s := broker.NewState()
		s.Apply(env, ev) // must not panic on any accepted event
	})
}
