package jobs_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
	"github.com/virtkit/virtkit/ci/jobs"
	"github.com/virtkit/virtkit/ci/jobs/jobstest"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/workers/launcher"
)

// tinyImage writes a root filesystem tar with one file and returns its tar: reference.
func tinyImage(t *testing.T, dir, name string) string {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	tw.WriteHeader(&tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755})
	tw.WriteHeader(&tar.Header{Name: "etc/hostname", Typeflag: tar.TypeReg, Mode: 0o644, Size: 5})
	tw.Write([]byte("tiny\n"))
	tw.Close()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return "tar:" + p
}

type pool struct {
	t       *testing.T
	srv     *broker.Server
	c       *broker.Client // the hooks' connection
	m       *jobstest.AgentMachines
	img     string
	imgDir  string
	store   string
	agent   string
	runners map[string]*runnerHandle
}

type runnerHandle struct {
	r      *jobs.Runner
	c      *broker.Client
	cancel context.CancelFunc
	done   chan error
}

func newPool(t *testing.T, o broker.SchemaOptions) *pool {
	t.Helper()
	srv, c := brokertest.Start(t, o)
	dir := t.TempDir()
	p := &pool{t: t, srv: srv, c: c, m: jobstest.NewAgentMachines(t), imgDir: dir, store: filepath.Join(dir, "images"),
		agent: cmdtest.Binary(t, "virtkit-agent"), runners: map[string]*runnerHandle{}}
	p.img = tinyImage(t, dir, "tiny.tar")
	return p
}

// runner starts a CI runner for host with slots capacity; lease is its LeaseTimeout.
func (p *pool) runner(host string, slots int, mod func(*jobs.Config)) *runnerHandle {
	t := p.t
	c := brokertest.Connect(t, p.srv.ClientConfig(), host)
	cfg := jobs.Config{
		Client: c, Slots: broker.NewSlots(slots), Machines: p.m,
		Images:     &jobs.Converter{Allowed: jobs.AllowList{"tar:" + p.imgDir}, Store: p.store, Agent: p.agent},
		JobTimeout: time.Minute, MaxCPUs: 4, MaxMemoryMiB: 4096, Net: "none",
		Log: zerolog.New(zerolog.NewTestWriter(t)).With().Str("host", host).Logger().Level(zerolog.InfoLevel),
	}
	if mod != nil {
		mod(&cfg)
	}
	r, err := jobs.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &runnerHandle{r: r, c: c, cancel: cancel, done: make(chan error, 1)}
	go func() { h.done <- r.Run(ctx) }()
	t.Cleanup(func() { h.stop() })
	p.runners[host] = h
	return h
}

func (h *runnerHandle) stop() error {
	h.cancel()
	select {
	case err := <-h.done:
		h.done <- err
		return err
	case <-time.After(90 * time.Second):
		return errors.New("runner did not stop within 90s")
	}
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func jobEvents(t *testing.T, c *broker.Client, id string) []broker.Event {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	var out []broker.Event
	var mu sync.Mutex
	sub, err := c.Subscribe(ctx, broker.SubscribeOptions{Filters: []string{broker.EventFilter("job", id, "")}},
		func(ctx context.Context, _ *broker.Envelope, ev broker.Event) error {
			mu.Lock()
			out = append(out, ev)
			mu.Unlock()
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	sub.Stop()
	mu.Lock()
	defer mu.Unlock()
	return out
}

func types(evs []broker.Event) string {
	var s []string
	for _, e := range evs {
		s = append(s, e.EventType())
	}
	return strings.Join(s, ",")
}

func TestJobPassFailCleanup(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{})
	p.runner("h1", 2, nil)
	ctx := ctxT(t, 2*time.Minute)

	pl, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "j1", Image: p.img})
	if err != nil {
		t.Fatal(err)
	}
	if pl.Host != "h1" || pl.VM != "j1" {
		t.Fatalf("placement %+v", pl)
	}
	var out, errb bytes.Buffer
	ex, err := jobs.Exec(ctx, p.c, pl, "build_script", []byte("echo hello $X\necho oops >&2\nexit 0\n"), &out, &errb, jobs.ExecOptions{Env: []string{"X=world"}})
	if err != nil || ex.Code != 0 {
		t.Fatalf("exec: %+v %v", ex, err)
	}
	if out.String() != "hello world\n" || errb.String() != "oops\n" {
		t.Fatalf("stdout %q stderr %q", out.String(), errb.String())
	}
	// A big output arrives whole and in order.
	out.Reset()
	ex, err = jobs.Exec(ctx, p.c, pl, "step_script", []byte("seq 1 200000\n"), &out, &errb, jobs.ExecOptions{})
	if err != nil || ex.Code != 0 {
		t.Fatalf("exec seq: %+v %v", ex, err)
	}
	var want strings.Builder
	for i := 1; i <= 200000; i++ {
		want.WriteString(strconv.Itoa(i) + "\n")
	}
	if out.String() != want.String() {
		t.Fatalf("seq output: %d bytes, want %d", out.Len(), want.Len())
	}
	// A failing script: its code comes back, no error.
	ex, err = jobs.Exec(ctx, p.c, pl, "my custom stage!", []byte("exit 3\n"), &out, &errb, jobs.ExecOptions{})
	if err != nil || ex.Code != 3 {
		t.Fatalf("exec exit 3: %+v %v", ex, err)
	}
	if p.m.Live() != 1 {
		t.Fatalf("%d machines live, want 1", p.m.Live())
	}
	if err := jobs.Cleanup(ctx, p.c, pl, true, 3); err != nil {
		t.Fatal(err)
	}
	if p.m.Live() != 0 {
		t.Fatalf("%d machines live after cleanup", p.m.Live())
	}
	if got := types(jobEvents(t, p.c, "j1")); got != "job.queued,job.started,job.failed" {
		t.Fatalf("events %s", got)
	}
	// The job is gone: a stage now is a system failure, a second cleanup a no-op.
	_, err = jobs.Exec(ctx, p.c, pl, "build_script", []byte("true\n"), &out, &errb, jobs.ExecOptions{})
	if !errors.Is(err, jobs.ErrSystem) {
		t.Fatalf("exec after cleanup: %v, want a system failure", err)
	}
	if err := jobs.Cleanup(ctx, p.c, pl, false, 0); err != nil {
		t.Fatal(err)
	}
}

func TestBootFailuresAndPolicy(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{})
	p.runner("h1", 2, nil)
	ctx := ctxT(t, time.Minute)
	bad := tinyImage(t, p.imgDir, "cannot-boot.tar")
	cases := []struct {
		name   string
		spec   jobs.Spec
		system bool
	}{
		{"disallowed registry", jobs.Spec{ID: "p1", Image: "docker.io/library/debian:12"}, false},
		{"local path outside the allowed folder", jobs.Spec{ID: "p2", Image: "tar:/etc/passwd"}, false},
		{"too big", jobs.Spec{ID: "p3", Image: p.img, CPUs: 64}, false},
		{"missing image", jobs.Spec{ID: "p4", Image: "tar:" + filepath.Join(p.imgDir, "nope.tar")}, true},
		{"malformed reference", jobs.Spec{ID: "p6", Image: "docker.io/library/UPPER CASE"}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := jobs.Submit(ctx, p.c, tc.spec)
			var f *jobs.Failure
			if !errors.As(err, &f) || f.System != tc.system {
				t.Fatalf("err %v, want a failure with system=%v", err, tc.system)
			}
		})
	}
	t.Run("vm cannot boot", func(t *testing.T) {
		p.m.FailVM = "p5"
		defer func() { p.m.FailVM = "" }()
		_, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "p5", Image: bad})
		var f *jobs.Failure
		if !errors.As(err, &f) || !f.System {
			t.Fatalf("err %v, want a system failure", err)
		}
	})
	if p.m.Live() != 0 || p.m.Boots() != 0 {
		t.Fatalf("%d machines live, %d booted; want none", p.m.Live(), p.m.Boots())
	}
}

func TestSignalsAndLease(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{})
	p.runner("h1", 2, func(c *jobs.Config) { c.LeaseTimeout = 2 * time.Second })
	ctx := ctxT(t, 2*time.Minute)
	pl, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "sig", Image: p.img})
	if err != nil {
		t.Fatal(err)
	}
	defer jobs.Cleanup(context.Background(), p.c, pl, false, 0)

	// SIGTERM reaches the stage's process group: the trap runs and the child sleep dies too.
	dir := t.TempDir()
	script := fmt.Sprintf("trap 'echo got TERM; exit 7' TERM\nsleep 300 &\necho $! > %s/child\necho started\nwait\n", dir)
	sigs := make(chan syscall.Signal, 1)
	var out bytes.Buffer
	started := make(chan struct{})
	go func() {
		for !strings.Contains(readFile(dir+"/child"), "\n") {
			time.Sleep(20 * time.Millisecond)
		}
		close(started)
		sigs <- syscall.SIGTERM
	}()
	ex, err := jobs.Exec(ctx, p.c, pl, "step_script", []byte(script), &out, &out, jobs.ExecOptions{Signals: sigs})
	<-started
	if err != nil || ex.Code != 7 || !strings.Contains(out.String(), "got TERM") {
		t.Fatalf("exit %+v err %v out %q", ex, err, out.String())
	}
	child, _ := strconv.Atoi(strings.TrimSpace(readFile(dir + "/child")))
	waitGone(t, child)

	// A hook that vanishes (no keep-alives) gets its stage killed after the lease.
	os.Remove(dir + "/child")
	hctx, hcancel := context.WithCancel(ctx)
	go func() {
		for !strings.Contains(readFile(dir+"/child"), "\n") {
			time.Sleep(20 * time.Millisecond)
		}
		hcancel() // the hook is SIGKILLed: it stops sending anything
	}()
	_, err = jobs.Exec(hctx, p.c, pl, "step_script", []byte(fmt.Sprintf("sleep 300 &\necho $! > %s/child\nwait\n", dir)), &out, &out, jobs.ExecOptions{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("exec with a vanished hook: %v", err)
	}
	child, _ = strconv.Atoi(strings.TrimSpace(readFile(dir + "/child")))
	waitGone(t, child)
}

func readFile(p string) string { b, _ := os.ReadFile(p); return string(b) }

func waitGone(t *testing.T, pid int) {
	t.Helper()
	if pid <= 1 {
		t.Fatalf("bad pid %d", pid)
	}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && strings.Contains(string(b), ") Z ") {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("process %d still runs", pid)
}

func TestReapAfterTimeout(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{})
	p.runner("h1", 1, nil)
	ctx := ctxT(t, time.Minute)
	pl, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "reap", Image: p.img, Timeout: broker.Duration(2 * time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	// The runner vanished: no cleanup ever comes. The host reaps the job and frees its slot.
	deadline := time.Now().Add(20 * time.Second)
	for p.m.Live() > 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if p.m.Live() != 0 {
		t.Fatal("job not reaped")
	}
	evs := jobEvents(t, p.c, pl.Job)
	if last, ok := evs[len(evs)-1].(*broker.JobCanceled); !ok || !strings.Contains(last.Reason, "reaped") {
		t.Fatalf("events %s", types(evs))
	}
	if _, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "after-reap", Image: p.img}); err != nil {
		t.Fatalf("the slot was not freed: %v", err)
	}
}

// TestHostDiesMidJob: a host that vanishes (its connection dies, nothing acked) has its job
// redelivered to another host, which fails it as a system failure without running it again;
// the other host's own jobs are untouched.
func TestHostDiesMidJob(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{WorkAckWait: 2 * time.Second})
	a := p.runner("ha", 1, nil)
	ctx := ctxT(t, 2*time.Minute)
	pa, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "on-a", Image: p.img})
	if err != nil || pa.Host != "ha" {
		t.Fatalf("%+v %v", pa, err)
	}
	p.runner("hb", 2, nil)
	pb, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "on-b", Image: p.img})
	if err != nil || pb.Host != "hb" {
		t.Fatalf("%+v %v", pb, err)
	}
	// Host a dies: its connection goes away without a word (and its VM with it).
	a.c.Close()
	a.stop()
	failed := make(chan *broker.JobFailed, 1)
	sub, err := p.c.Subscribe(ctx, broker.SubscribeOptions{Filters: []string{broker.EventFilter("job", "on-a", "failed")}},
		func(ctx context.Context, _ *broker.Envelope, ev broker.Event) error {
			failed <- ev.(*broker.JobFailed)
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Stop()
	select {
	case f := <-failed:
		if !f.System {
			t.Fatalf("job on the dead host failed with %+v, want a system failure", f)
		}
	case <-ctx.Done():
		t.Fatal("the dead host's job was never failed")
	}
	// The stage on a's job is a system failure; b's job runs on.
	var out bytes.Buffer
	if _, err := jobs.Exec(ctx, p.c, pa, "build_script", []byte("true\n"), &out, &out, jobs.ExecOptions{HostTimeout: 3 * time.Second}); !errors.Is(err, jobs.ErrSystem) {
		t.Fatalf("stage on the dead host: %v", err)
	}
	ex, err := jobs.Exec(ctx, p.c, pb, "build_script", []byte("echo fine\n"), &out, &out, jobs.ExecOptions{})
	if err != nil || ex.Code != 0 || out.String() != "fine\n" {
		t.Fatalf("b's job: %+v %v %q", ex, err, out.String())
	}
	if err := jobs.Cleanup(ctx, p.c, pb, false, 0); err != nil {
		t.Fatal(err)
	}
	// Only one boot per job: the redelivered item did not boot a VM.
	if p.m.Boots() != 2 {
		t.Fatalf("%d boots, want 2", p.m.Boots())
	}
}

// TestPoolDrains20Jobs: two hosts with two slots each take 20 queued jobs; every job runs its
// stage exactly once.
func TestPoolDrains20Jobs(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{})
	p.runner("ha", 2, nil)
	p.runner("hb", 2, nil)
	ctx := ctxT(t, 3*time.Minute)
	log := filepath.Join(t.TempDir(), "ran")
	var wg sync.WaitGroup
	hosts := make([]string, 20)
	errs := make(chan error, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("q%02d", i)
			pl, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: id, Image: p.img})
			if err != nil {
				errs <- fmt.Errorf("%s: %w", id, err)
				return
			}
			hosts[i] = pl.Host
			var out bytes.Buffer
			ex, err := jobs.Exec(ctx, p.c, pl, "build_script", []byte(fmt.Sprintf("echo %s >> %s\nsleep 0.2\n", id, log)), &out, &out, jobs.ExecOptions{})
			if err != nil || ex.Code != 0 {
				errs <- fmt.Errorf("%s: exec %+v %v %s", id, ex, err, out.String())
			}
			if err := jobs.Cleanup(ctx, p.c, pl, false, 0); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	lines := strings.Fields(readFile(log))
	seen := map[string]int{}
	for _, l := range lines {
		seen[l]++
	}
	for i := range 20 {
		if id := fmt.Sprintf("q%02d", i); seen[id] != 1 {
			t.Errorf("job %s ran %d times", id, seen[id])
		}
	}
	per := map[string]int{}
	for _, h := range hosts {
		per[h]++
	}
	if per["ha"] == 0 || per["hb"] == 0 {
		t.Errorf("jobs per host %v: both hosts should have taken some", per)
	}
	if p.m.Live() != 0 {
		t.Errorf("%d machines left", p.m.Live())
	}
}

func TestAllowList(t *testing.T) {
	al := jobs.AllowList{"registry.gitlab.com/acme", "docker.io/library", "tar:/srv/images", "oci:"}
	for ref, ok := range map[string]bool{
		"debian:12":                true,
		"docker.io/library/alpine": true,
		"docker://index.docker.io/library/alpine:3": true,
		"docker.io/evil/alpine":                     false,
		"registry.gitlab.com/acme/app:1":            true,
		"registry.gitlab.com/acme":                  true,
		"registry.gitlab.com/acmeevil/app":          false,
		"registry.gitlab.com.evil.io/acme/app":      false,
		"tar:/srv/images/debian.tar":                true,
		"tar:/srv/images/../../etc/shadow":          false,
		"tar:/srv/imagesevil/x.tar":                 false,
		"docker-archive:/srv/images/x.tar":          false,
		"oci:/anywhere":                             true,
		"quay.io/acme/app":                          false,
		"":                                          false,
	} {
		if err := al.Check(ref); (err == nil) != ok {
			t.Errorf("Check(%q) = %v, want allowed=%v", ref, err, ok)
		}
	}
	if err := (jobs.AllowList{}).Check("debian"); err == nil {
		t.Error("an empty allow-list allowed an image")
	}
}

// slowMachines boots after a delay, to catch a job mid-boot.
type slowMachines struct {
	*jobstest.AgentMachines
	delay time.Duration
}

func (m slowMachines) Boot(ctx context.Context, req launcher.Request) (jobs.Machine, error) {
	select {
	case <-time.After(m.delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return m.AgentMachines.Boot(ctx, req)
}

// TestAbandonedJobs: a prepare that gives up (killed, timed out) takes its job back, whether a
// host is booting it or it still waits in the queue.
func TestAbandonedJobs(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{})
	p.runner("h1", 1, func(c *jobs.Config) { c.Machines = slowMachines{p.m, 3 * time.Second} })
	ctx := ctxT(t, time.Minute)

	// Booting: the host aborts it.
	sctx, cancel := context.WithTimeout(ctx, time.Second)
	_, err := jobs.Submit(sctx, p.c, jobs.Spec{ID: "gone-booting", Image: p.img})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("submit: %v", err)
	}
	// The slot is free again soon: the next job boots (after the 3 s delay) and nothing else is.
	pl, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "next", Image: p.img})
	if err != nil {
		t.Fatal(err)
	}
	if p.m.Boots() != 1 || p.m.Live() != 1 {
		t.Fatalf("%d boots, %d live; want only the next job's VM", p.m.Boots(), p.m.Live())
	}
	// Queued behind it: deleted from the queue, never booted.
	sctx, cancel = context.WithTimeout(ctx, time.Second)
	_, err = jobs.Submit(sctx, p.c, jobs.Spec{ID: "gone-queued", Image: p.img})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("submit: %v", err)
	}
	if err := jobs.Cleanup(ctx, p.c, pl, false, 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Second)
	if p.m.Boots() != 1 || p.m.Live() != 0 {
		t.Fatalf("%d boots, %d live after the queued job was abandoned", p.m.Boots(), p.m.Live())
	}
	for _, id := range []string{"gone-booting", "gone-queued"} {
		if got := types(jobEvents(t, p.c, id)); !strings.HasSuffix(got, "job.canceled") || strings.Contains(got, "job.started") {
			t.Errorf("%s events %s", id, got)
		}
	}
}

// TestLostDeliveryRuns: an item delivered to a host that never got it (the delivery was lost
// with a connection) comes back and runs, since no host marked it taken.
func TestLostDeliveryRuns(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{WorkAckWait: 2 * time.Second})
	ctx := ctxT(t, time.Minute)
	// Take the item with a raw consumer fetch and drop it on the floor.
	js := p.c.JetStream()
	cons, err := js.Consumer(ctx, broker.WorkStream, broker.WorkConsumerName(broker.WorkCIJob))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan *jobs.Placement, 1)
	go func() {
		pl, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "lost", Image: p.img})
		if err != nil {
			t.Error(err)
		}
		done <- pl
	}()
	msg, err := cons.Next(jetstream.FetchMaxWait(10 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if md, _ := msg.Metadata(); md.NumDelivered != 1 {
		t.Fatalf("delivered %d times", md.NumDelivered)
	}
	p.runner("h1", 1, nil)
	pl := <-done
	if pl == nil {
		t.Fatal("the job did not start")
	}
	if err := jobs.Cleanup(ctx, p.c, pl, false, 0); err != nil {
		t.Fatal(err)
	}
	if got := types(jobEvents(t, p.c, "lost")); got != "job.queued,job.started,job.succeeded" {
		t.Fatalf("events %s", got)
	}
}

// TestServicesHoldSlots: each service VM takes a slot of the host's capacity for the job's life;
// a job whose services do not fit now is handed back and runs once room is made; one that can
// never fit fails as the job's fault.
func TestServicesHoldSlots(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{})
	p.runner("h1", 3, func(c *jobs.Config) { c.SlotWait = time.Second })
	ctx := ctxT(t, 2*time.Minute)
	svc := []jobs.Service{{Image: p.img, Aliases: []string{"cache"}, Entrypoint: []string{"sleep", "600"}}}

	a, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "with-svc", Image: p.img, Services: svc})
	if err != nil {
		t.Fatal(err)
	}
	if p.m.Live() != 2 {
		t.Fatalf("%d machines live; want the job and its service", p.m.Live())
	}
	// The service runs its entrypoint for the job's life.
	var out, errb bytes.Buffer
	if ex, err := jobs.Exec(ctx, p.c, a, "check", []byte("pgrep -x sleep >/dev/null && echo service-up\n"), &out, &errb, jobs.ExecOptions{}); err != nil || ex.Code != 0 || out.String() != "service-up\n" {
		t.Fatalf("service entrypoint: %+v %v %q %q", ex, err, out.String(), errb.String())
	}
	// The third slot takes a plain job.
	c, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "plain", Image: p.img})
	if err != nil {
		t.Fatal(err)
	}
	// A second job with a service: queued while the host is full; once the plain job is gone its
	// item gets a slot but its service none, so it goes back to the queue until the first job
	// is gone too.
	started := make(chan *jobs.Placement, 1)
	go func() {
		pl, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "waits", Image: p.img, Services: svc})
		if err != nil {
			t.Error(err)
		}
		started <- pl
	}()
	if err := jobs.Cleanup(ctx, p.c, c, false, 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * time.Second)
	if n := p.m.Live(); n != 2 {
		t.Fatalf("%d machines live while the first job holds 2 of 3 slots; want only its 2", n)
	}
	if err := jobs.Cleanup(ctx, p.c, a, false, 0); err != nil {
		t.Fatal(err)
	}
	b := <-started
	if b == nil {
		t.FailNow()
	}
	if err := jobs.Cleanup(ctx, p.c, b, false, 0); err != nil {
		t.Fatal(err)
	}
	if got := types(jobEvents(t, p.c, "waits")); got != "job.queued,job.started,job.succeeded" {
		t.Fatalf("events of the handed-back job: %s", got)
	}

	// Three services and the job need 4 slots; the host has 3.
	many := []jobs.Service{svc[0], {Image: p.img, Entrypoint: []string{"sleep", "600"}}, {Image: p.img, Entrypoint: []string{"sleep", "600"}}}
	_, err = jobs.Submit(ctx, p.c, jobs.Spec{ID: "too-many", Image: p.img, Services: many})
	var f *jobs.Failure
	if !errors.As(err, &f) || f.System || !strings.Contains(f.Msg, "needs 4 VM slots") {
		t.Fatalf("too many services: %v", err)
	}
	// Every slot came back: a job with two services takes all three.
	d, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "full", Image: p.img, Services: many[:2]})
	if err != nil {
		t.Fatal(err)
	}
	if p.m.Live() != 3 {
		t.Fatalf("%d machines live, want 3", p.m.Live())
	}
	jobs.Cleanup(ctx, p.c, d, false, 0)
	// A service whose VM cannot boot fails the job (system) and leaves nothing.
	p.m.FailVM = "svcfail-s0"
	_, err = jobs.Submit(ctx, p.c, jobs.Spec{ID: "svcfail", Image: p.img, Services: svc})
	p.m.FailVM = ""
	if !errors.As(err, &f) || !f.System {
		t.Fatalf("service that cannot boot: %v", err)
	}
	waitUntil(t, "nothing live", func() bool { return p.m.Live() == 0 })
}

// TestCancelBeforeRegistration: a runner's cancel that reaches the host before the job is
// registered there (between the fetch and the registration) drops the job when it registers.
func TestCancelBeforeRegistration(t *testing.T) {
	p := newPool(t, broker.SchemaOptions{})
	p.runner("h1", 1, nil)
	ctx := ctxT(t, time.Minute)
	// A job first: the host is up and listening.
	pl, err := jobs.Submit(ctx, p.c, jobs.Spec{ID: "before", Image: p.img})
	if err != nil {
		t.Fatal(err)
	}
	jobs.Cleanup(ctx, p.c, pl, false, 0)
	b, _ := json.Marshal(jobs.CleanupRequest{Job: "early-cancel"})
	if err := p.c.Conn().Publish(jobs.CancelSubject, b); err != nil {
		t.Fatal(err)
	}
	p.c.Conn().Flush()
	time.Sleep(200 * time.Millisecond) // the host handles it before the item arrives
	_, err = jobs.Submit(ctx, p.c, jobs.Spec{ID: "early-cancel", Image: p.img})
	var f *jobs.Failure
	if !errors.As(err, &f) || !strings.Contains(f.Msg, "canceled") {
		t.Fatalf("submit: %v, want the job canceled", err)
	}
	if p.m.Boots() != 1 {
		t.Fatalf("%d VMs booted; the canceled job must not boot", p.m.Boots())
	}
}

func TestTapPool(t *testing.T) {
	for _, bad := range [][]string{nil, {"ok0", "ok0"}, {"much-too-long-name"}, {"a/b"}, {""}} {
		if _, err := jobs.NewTapPool(bad); err == nil {
			t.Errorf("NewTapPool(%q) accepted", bad)
		}
	}
	p, err := jobs.NewTapPool([]string{"vkpool0", "vkpool1"})
	if err != nil {
		t.Fatal(err)
	}
	a, err1 := p.Lease("ja")
	b, err2 := p.Lease("jb")
	if err1 != nil || err2 != nil || a == b {
		t.Fatalf("leases %q %q: %v %v", a, b, err1, err2)
	}
	if _, err := p.Lease("jc"); err == nil || !strings.Contains(err.Error(), "no free tap") || !strings.Contains(err.Error(), "vkpool0, vkpool1") {
		t.Fatalf("exhausted pool: %v", err)
	}
	p.Return(a)
	if c, err := p.Lease("jc"); err != nil || c != a {
		t.Fatalf("after return: %q %v", c, err)
	}
	if got := p.Leased(); got[a] != "jc" || got[b] != "jb" || len(got) != 2 {
		t.Fatalf("leased %v", got)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
