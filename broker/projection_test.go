package broker_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
)

// genEvents makes n events about a few hundred VMs, images and jobs (and hosts when withHosts),
// in a random but reproducible order, including out-of-order lifecycles.
func genEvents(n int, seed uint64, withHosts bool) []broker.Event {
	r := rand.New(rand.NewPCG(seed, 42))
	out := make([]broker.Event, 0, n)
	kinds := 9
	if withHosts {
		kinds = 11
	}
	for i := 0; i < n; i++ {
		vm := fmt.Sprintf("vm-%d", r.IntN(300))
		img := fmt.Sprintf("img-%d", r.IntN(50))
		jb := fmt.Sprintf("job-%d", r.IntN(300))
		host := fmt.Sprintf("host-%d", r.IntN(5))
		var ev broker.Event
		switch r.IntN(kinds) {
		case 0:
			ev = &broker.VMStarting{VM: vm, Host: host, Image: img, VMM: "qemu", CPUs: 1 + r.IntN(4), MemoryMiB: 256 << r.IntN(4), Job: jb}
		case 1:
			ev = &broker.VMReady{VM: vm, IP: fmt.Sprintf("10.77.0.%d", 2+r.IntN(250)), BootMillis: int64(r.IntN(3000))}
		case 2:
			ev = &broker.VMStopped{VM: vm, ExitCode: r.IntN(3), Reason: "poweroff"}
		case 3:
			ev = &broker.VMFailed{VM: vm, Error: fmt.Sprint("vmm exited ", i)}
		case 4:
			ev = &broker.ImageConverting{Image: img, Ref: "docker.io/library/" + img, Host: host}
		case 5:
			ev = &broker.ImageConverted{Image: img, Ref: "docker.io/library/" + img, Digest: fmt.Sprintf("sha256:%064x", r.Uint64()), SizeBytes: r.Int64N(1 << 30)}
		case 6:
			ev = &broker.JobQueued{Job: jb, Image: img, Command: []string{"make", fmt.Sprint("t", i)}}
		case 7:
			ev = &broker.JobStarted{Job: jb, Host: host, VM: vm}
		case 8:
			switch r.IntN(3) {
			case 0:
				ev = &broker.JobSucceeded{Job: jb}
			case 1:
				ev = &broker.JobFailed{Job: jb, ExitCode: 1 + r.IntN(100), System: r.IntN(2) == 0}
			default:
				ev = &broker.JobCanceled{Job: jb, Reason: "user"}
			}
		case 9:
			ev = &broker.HostHeartbeat{Host: host, Capacity: 4, Running: r.IntN(5), Started: time.Unix(1700000000, 0).UTC(), TTL: broker.Duration(time.Minute)}
		case 10:
			ev = &broker.HostStopped{Host: host}
		}
		out = append(out, ev)
	}
	return out
}

// envelopes wraps events from source.
func envelopes(t testing.TB, source string, evs []broker.Event) []*broker.Envelope {
	out := make([]*broker.Envelope, len(evs))
	for i, ev := range evs {
		env, err := broker.NewEnvelope(source, ev)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = env
	}
	return out
}

// fold is the expected state: the envelopes applied in sequence order.
func fold(t testing.TB, envs []*broker.Envelope) *broker.State {
	sorted := append([]*broker.Envelope(nil), envs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Seq < sorted[j].Seq })
	s := broker.NewState()
	for _, env := range sorted {
		if env.Seq == 0 {
			t.Fatalf("envelope %s has no sequence", env.ID)
		}
		ev, err := env.Event()
		if err != nil {
			t.Fatal(err)
		}
		s.Apply(env, ev)
	}
	return s
}

func publishAll(t testing.TB, ctx context.Context, c *broker.Client, envs []*broker.Envelope) int {
	t.Helper()
	dups := 0
	for start := 0; start < len(envs); start += 500 {
		b := c.NewBatch()
		for _, env := range envs[start:min(start+500, len(envs))] {
			if err := b.Add(env); err != nil {
				t.Fatal(err)
			}
		}
		n, err := b.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		dups += n
	}
	return dups
}

func waitProjected(t testing.TB, ctx context.Context, c *broker.Client, hosts ...string) {
	t.Helper()
	for _, h := range hosts {
		for {
			lag, err := broker.ProjectionLag(ctx, c, h)
			if err == nil && lag == 0 {
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("projector %s did not catch up (lag %d, %v)", h, lag, err)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}

func diffStates(t testing.TB, what string, want, got *broker.State, hosts bool) {
	t.Helper()
	for _, d := range []struct {
		table      string
		want, got  any
		skipIfHost bool
	}{
		{"vms", want.VMs, got.VMs, false}, {"images", want.Images, got.Images, false},
		{"jobs", want.Jobs, got.Jobs, false}, {"hosts", want.Hosts, got.Hosts, true},
	} {
		if d.skipIfHost && !hosts {
			continue
		}
		if diff := cmp.Diff(d.want, d.got); diff != "" {
			t.Errorf("%s: %s differ (-want +got):\n%s", what, d.table, diff)
		}
	}
}

// Two projectors (two hosts) run at once; the live KV tables equal a replay of the log and the
// expected fold, and a rebuild from the log gives the same tables again.
func TestProjectionReplayEqualsLive(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	srv, c := brokertest.Start(t, broker.SchemaOptions{})
	h2 := brokertest.Connect(t, srv.ClientConfig(), "h2")
	pctx, stop := context.WithCancel(ctx)
	errs := make(chan error, 2)
	for _, cl := range []*broker.Client{c, h2} {
		p := broker.NewProjector(cl, brokerLog(t))
		go func() { errs <- p.Run(pctx) }()
	}
	envs := envelopes(t, "h1", genEvents(3000, 1, true))
	// Publish half, let the projectors start, publish the rest.
	publishAll(t, ctx, c, envs[:1500])
	publishAll(t, ctx, c, envs[1500:])
	waitProjected(t, ctx, c, "h1", "h2")
	want := fold(t, envs)
	if len(want.VMs) == 0 || len(want.Jobs) == 0 || len(want.Images) == 0 {
		t.Fatal("generator made empty tables")
	}
	live, err := broker.ReadProjection(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	replay, err := broker.Replay(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	diffStates(t, "replay vs expected", want, replay, true)
	diffStates(t, "live vs expected", want, live, true)

	stop()
	for i := 0; i < 2; i++ {
		if err := <-errs; err != nil {
			t.Errorf("projector: %v", err)
		}
	}
	rebuilt, err := broker.RebuildProjection(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	after, err := broker.ReadProjection(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	diffStates(t, "rebuilt vs expected", want, rebuilt, true)
	diffStates(t, "KV after rebuild vs expected", want, after, true)
}

// Applying the same events twice, or an older event after a newer one, changes nothing.
func TestStateApplyIdempotent(t *testing.T) {
	envs := envelopes(t, "h", genEvents(500, 7, true))
	for i, env := range envs {
		env.Seq = uint64(i + 1)
	}
	once := fold(t, envs)
	twice := fold(t, envs)
	for _, env := range envs { // replay everything again into the same state, newest first
		ev, _ := env.Event()
		twice.Apply(env, ev)
	}
	for i := len(envs) - 1; i >= 0; i-- {
		ev, _ := envs[i].Event()
		if twice.Apply(envs[i], ev) {
			t.Fatalf("re-applying event %d changed the state", i+1)
		}
	}
	diffStates(t, "twice vs once", once, twice, true)
}
