package broker_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestProvisionIdempotentAndUpdatesLimits(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	js := c.JetStream()
	if _, err := c.Publish(ctx, &broker.VMReady{VM: "a"}); err != nil {
		t.Fatal(err)
	}
	// Same schema again: nothing changes, data kept.
	if err := broker.Provision(ctx, js, broker.DefaultSchema(broker.SchemaOptions{})); err != nil {
		t.Fatalf("second provision: %v", err)
	}
	// New limits: applied in place.
	o := broker.SchemaOptions{EventsMaxBytes: 64 << 20, ExecMaxAge: 10 * time.Minute, HostTTL: time.Minute, WorkAckWait: 7 * time.Second}
	if err := broker.Provision(ctx, js, broker.DefaultSchema(o)); err != nil {
		t.Fatalf("provision with new limits: %v", err)
	}
	ev, err := js.Stream(ctx, broker.EventsStream)
	if err != nil {
		t.Fatal(err)
	}
	if got := ev.CachedInfo(); got.Config.MaxBytes != 64<<20 || got.State.Msgs != 1 || got.Config.Duplicates != 2*time.Minute {
		t.Errorf("events: max bytes %d msgs %d dupes %v, want %d 1 2m", got.Config.MaxBytes, got.State.Msgs, got.Config.Duplicates, 64<<20)
	}
	ex, _ := js.Stream(ctx, broker.ExecStream)
	if got := ex.CachedInfo().Config.MaxAge; got != 10*time.Minute {
		t.Errorf("exec max age %v, want 10m", got)
	}
	wq, _ := js.Stream(ctx, broker.WorkStream)
	if got := wq.CachedInfo().Config.Retention; got != jetstream.WorkQueuePolicy {
		t.Errorf("work retention %v", got)
	}
	cons, err := js.Consumer(ctx, broker.WorkStream, broker.WorkConsumerName(broker.WorkVMLaunch))
	if err != nil {
		t.Fatal(err)
	}
	if got := cons.CachedInfo().Config.AckWait; got != 7*time.Second {
		t.Errorf("launch consumer ack wait %v, want 7s", got)
	}
	kv, err := js.KeyValue(ctx, broker.BucketHosts)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := kv.Status(ctx)
	if st.TTL() != time.Minute {
		t.Errorf("vk_hosts TTL %v, want 1m", st.TTL())
	}
	// A change the server cannot apply names the stream.
	bad := broker.DefaultSchema(broker.SchemaOptions{})
	bad.Streams[0].Storage = jetstream.MemoryStorage
	if err := broker.Provision(ctx, js, bad); err == nil || !strings.Contains(err.Error(), broker.EventsStream) {
		t.Errorf("storage change: %v, want an error naming %s", err, broker.EventsStream)
	}
}

func TestDuplicatePublishStoredOnce(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	env, err := broker.NewEnvelope(c.Host(), &broker.JobQueued{Job: "j1", Image: "alpine"})
	if err != nil {
		t.Fatal(err)
	}
	first, err := c.PublishEnvelope(ctx, env)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		ack, err := c.PublishEnvelope(ctx, env)
		if err != nil {
			t.Fatal(err)
		}
		if !ack.Duplicate || ack.Sequence != first.Sequence {
			t.Errorf("retry %d: duplicate=%v seq=%d, want true %d", i, ack.Duplicate, ack.Sequence, first.Sequence)
		}
	}
	b := c.NewBatch()
	for i := 0; i < 5; i++ {
		if err := b.Add(env); err != nil {
			t.Fatal(err)
		}
	}
	dups, err := b.Wait(ctx)
	if err != nil || dups != 5 {
		t.Errorf("batch of retries: %d duplicates, err %v; want 5", dups, err)
	}
	st, _ := c.JetStream().Stream(ctx, broker.EventsStream)
	if n := st.CachedInfo().State.Msgs; n != 1 {
		t.Errorf("%d events stored, want 1", n)
	}
	// Work submissions are deduplicated by id too.
	for i := 0; i < 3; i++ {
		if _, err := c.Submit(ctx, broker.WorkImageConvert, "convert-alpine", map[string]string{"ref": "alpine"}); err != nil {
			t.Fatal(err)
		}
	}
	wq, _ := c.JetStream().Stream(ctx, broker.WorkStream)
	if n := wq.CachedInfo().State.Msgs; n != 1 {
		t.Errorf("%d work items queued, want 1", n)
	}
}

func TestEnvelopeRoundTrip(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	want := &broker.ImageConverted{Image: "alpine-3", Ref: "docker.io/library/alpine:3", Digest: "sha256:ab", SizeBytes: 1 << 20, FSUUID: "u"}
	got := make(chan *broker.Envelope, 1)
	sub, err := c.Subscribe(ctx, broker.SubscribeOptions{Filters: []string{broker.EventFilter("image", "", "converted")}},
		func(_ context.Context, env *broker.Envelope, ev broker.Event) error {
			if diff := cmp.Diff(want, ev); diff != "" {
				t.Errorf("event body (-want +got):\n%s", diff)
			}
			got <- env
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Stop()
	if _, err := c.Publish(ctx, &broker.ImageFailed{Image: "other", Error: "x"}); err != nil {
		t.Fatal(err)
	}
	sent, err := c.Publish(ctx, want)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case env := <-got:
		if env.ID != sent.ID || env.Type != "image.converted" || env.Source != "h1" || env.Subject != "alpine-3" ||
			env.SpecVersion != "1.0" || env.DataVersion != 1 || env.Seq != 2 || !env.Time.Equal(sent.Time) {
			t.Errorf("envelope %+v, sent %+v", env, sent)
		}
		if s := env.NATSSubject(); s != "vk.evt.image.alpine-3.converted" {
			t.Errorf("subject %q", s)
		}
	case <-ctx.Done():
		t.Fatal("event not received")
	}
	sub.Drain()
	select {
	case <-sub.Closed():
	case <-time.After(10 * time.Second):
		t.Fatal("subscription did not close after Drain")
	}
	if err := sub.Err(); err != nil {
		t.Errorf("subscription error after drain: %v", err)
	}
}

func TestSubscriptionHandlerErrorEndsIt(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	boom := errors.New("boom")
	sub, err := c.Subscribe(ctx, broker.SubscribeOptions{}, func(context.Context, *broker.Envelope, broker.Event) error { return boom })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Publish(ctx, &broker.VMFailed{VM: "v", Error: "e"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sub.Closed():
	case <-ctx.Done():
		t.Fatal("subscription did not end")
	}
	if !errors.Is(sub.Err(), boom) {
		t.Errorf("Err() = %v, want boom", sub.Err())
	}
}

func TestBadIDsRejected(t *testing.T) {
	for _, id := range []string{"", "a.b", "a b", "a*", "x>", strings.Repeat("x", 129), "tab\t"} {
		if _, err := broker.NewEnvelope("h", &broker.VMReady{VM: id}); !errors.Is(err, broker.ErrBadToken) {
			t.Errorf("VM id %q: %v, want ErrBadToken", id, err)
		}
	}
	if got := broker.HostID("build-1.example.com"); got != "build-1-example-com" {
		t.Errorf("HostID = %q", got)
	}
}

func TestConnectErrors(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	dir := t.TempDir()
	unreadable := filepath.Join(dir, "creds")
	if err := os.WriteFile(unreadable, []byte("x"), 0o000); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  broker.Config
		want string
	}{
		{"empty", broker.Config{}, "empty NATS URL"},
		{"scheme", broker.Config{URL: "http://localhost:4222"}, `scheme "http"`},
		{"no host", broker.Config{URL: "nats://"}, "not like nats://host:4222"},
		{"missing creds", broker.Config{URL: "nats://127.0.0.1:1", Creds: filepath.Join(dir, "nope")}, "creds file"},
		{"both creds", broker.Config{URL: "nats://127.0.0.1:1", Creds: unreadable, NKeySeed: unreadable}, "use one"},
		{"cert without key", broker.Config{URL: "nats://127.0.0.1:1", TLSCert: unreadable}, "tls_cert and tls_key"},
		{"nobody listening", broker.Config{URL: "nats://127.0.0.1:1"}, "127.0.0.1:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := broker.Connect(ctx, tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Connect: %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if os.Geteuid() != 0 { // root reads mode-0 files
		if _, err := broker.Connect(ctx, broker.Config{URL: "nats://127.0.0.1:1", Creds: unreadable}); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Errorf("unreadable creds: %v", err)
		}
	}
	// A wrong credential is refused by the server.
	srv := brokertest.Server(t, "")
	other := t.TempDir()
	o2 := brokertest.Server(t, other) // a second server just to make a second credential
	cfg := srv.ClientConfig()
	cfg.NKeySeed = o2.ClientConfig().NKeySeed
	if _, err := broker.Connect(ctx, cfg); err == nil || !strings.Contains(strings.ToLower(err.Error()), "authorization") {
		t.Errorf("wrong credential: %v, want an authorization error", err)
	}
	// Without any credential too.
	cfg.NKeySeed = ""
	if _, err := broker.Connect(ctx, cfg); err == nil {
		t.Error("connect without credential succeeded")
	}
}

func TestServerLockAndCredentialFile(t *testing.T) {
	dir := t.TempDir()
	srv := brokertest.Server(t, dir)
	ctx := ctxT(t, time.Minute)
	if _, err := broker.StartServer(ctx, broker.ServerConfig{StateDir: dir}); err == nil || !strings.Contains(err.Error(), "another virtkit server") {
		t.Errorf("second server on one state dir: %v", err)
	}
	fi, err := os.Stat(srv.ClientConfig().NKeySeed)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("credential mode %v, want 0600", fi.Mode().Perm())
	}
	if !strings.HasPrefix(srv.URL(), "nats://127.0.0.1:") {
		t.Errorf("URL %q is not loopback", srv.URL())
	}
}

func TestConnectLocal(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	dir := t.TempDir()
	if _, err := broker.ConnectLocal(ctx, dir); !errors.Is(err, broker.ErrNoDaemon) {
		t.Errorf("no endpoint: %v, want ErrNoDaemon", err)
	}
	srv := brokertest.Server(t, dir)
	ep := broker.Endpoint{Config: srv.ClientConfig(), PID: os.Getpid(), Started: time.Now(), Embedded: true}
	if err := broker.WriteEndpoint(dir, ep); err != nil {
		t.Fatal(err)
	}
	c, err := broker.ConnectLocal(ctx, dir, broker.WithHost("client1"))
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	// A group-readable endpoint file is refused.
	if err := os.Chmod(broker.EndpointPath(dir), 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := broker.ConnectLocal(ctx, dir); !errors.Is(err, broker.ErrInsecureCredential) {
		t.Errorf("0640 endpoint: %v, want ErrInsecureCredential", err)
	}
	os.Chmod(broker.EndpointPath(dir), 0o600)
	// A dead daemon's file is stale.
	ep.PID = deadPID(t)
	if err := broker.WriteEndpoint(dir, ep); err != nil {
		t.Fatal(err)
	}
	if _, err := broker.ConnectLocal(ctx, dir); !errors.Is(err, broker.ErrNoDaemon) || !strings.Contains(err.Error(), "stale") {
		t.Errorf("dead daemon: %v, want stale ErrNoDaemon", err)
	}
}

// deadPID returns a pid that is not running.
func deadPID(t *testing.T) int {
	for pid := 4000000; pid > 3000000; pid -= 7 {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
			return pid
		}
	}
	t.Fatal("no free pid")
	return 0
}

// FuzzReadEndpoint: whatever is in the endpoint file, ReadEndpoint returns an endpoint with a URL
// or an error; it never panics.
func FuzzReadEndpoint(f *testing.F) {
	f.Add([]byte(`{"url":"nats://127.0.0.1:4222","nkey_seed":"/x/local.nk","pid":0,"started":"2026-01-01T00:00:00Z","embedded":true}`))
	f.Add([]byte(`{"url":""}`))
	f.Add([]byte(`{"url":"tls://a:1,tls://b:2","creds":"/c","tls_ca":"/ca","pid":-5}`))
	f.Add([]byte(`[]`))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		p := broker.EndpointPath(dir)
		os.MkdirAll(filepath.Dir(p), 0o700)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		ep, err := broker.ReadEndpoint(dir)
		if err == nil && ep.URL == "" {
			t.Fatal("accepted an endpoint without a URL")
		}
	})
}

// Exec output is kept for reconnecting clients; input channels are not stored.
func TestExecStream(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	nc := c.Conn()
	for i, ch := range []string{broker.ExecStdout, broker.ExecStderr, broker.ExecStdin, broker.ExecResize, broker.ExecStdout, broker.ExecExit} {
		if _, err := c.JetStream().Publish(ctx, broker.ExecSubject("x1", ch), []byte(fmt.Sprint(i))); err != nil {
			if ch == broker.ExecStdin || ch == broker.ExecResize {
				continue // no stream takes input: expected
			}
			t.Fatalf("%s: %v", ch, err)
		}
		if ch == broker.ExecStdin || ch == broker.ExecResize {
			t.Errorf("%s was stored", ch)
		}
	}
	if err := nc.Publish(broker.ExecSubject("x1", broker.ExecSignal), []byte("TERM")); err != nil {
		t.Fatal(err)
	}
	nc.Flush()
	// A client that connects late replays the output in order.
	cons, err := c.JetStream().OrderedConsumer(ctx, broker.ExecStream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{broker.ExecSubject("x1", "*")}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for len(got) < 4 {
		msg, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatalf("after %v: %v", got, err)
		}
		got = append(got, strings.TrimPrefix(msg.Subject(), "vk.exec.x1.")+"="+string(msg.Data()))
	}
	if want := "stdout=0 stderr=1 stdout=4 exit=5"; strings.Join(got, " ") != want {
		t.Errorf("replayed %v, want %s", got, want)
	}
	last, err := c.LastEventSeq(ctx)
	if err != nil || last != 0 {
		t.Errorf("LastEventSeq on an empty log = %d, %v", last, err)
	}
}
