// Package ci_test measures the pooled CI executor: where a job's overhead goes on real microVMs
// (enqueue → VM ready, stage dispatch, cleanup) and how fast the queue hands out jobs when VM boot
// is taken out (1,000 no-op jobs against a pool of two hosts). Run with bench.sh.
package ci_test

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
	"github.com/virtkit/virtkit/ci/jobs"
	"github.com/virtkit/virtkit/ci/jobs/jobstest"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/switch/lan"
	"github.com/virtkit/virtkit/workers/launcher"
)

// timedMachines measures each boot, so dispatch overhead can be told from boot time.
type timedMachines struct {
	jobs.Machines
	mu    sync.Mutex
	boots map[string]time.Duration
}

func (m *timedMachines) Boot(ctx context.Context, req launcher.Request) (jobs.Machine, error) {
	t0 := time.Now()
	vm, err := m.Machines.Boot(ctx, req)
	m.mu.Lock()
	m.boots[req.Name] = time.Since(t0)
	m.mu.Unlock()
	return vm, err
}

func (m *timedMachines) boot(name string) time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.boots[name]
}

func startRunner(b *testing.B, srv *broker.Server, host string, slots int, m jobs.Machines, img jobs.Images) {
	c := brokertest.Connect(b, srv.ClientConfig(), host)
	r, err := jobs.New(jobs.Config{Client: c, Slots: broker.NewSlots(slots), Machines: m, Images: img,
		MaxCPUs: 2, MaxMemoryMiB: 1024, Net: "none", Log: zerolog.Nop()})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	b.Cleanup(func() { cancel(); <-done })
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func tinyImage(b *testing.B, dir string) string {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "etc/hostname", Typeflag: tar.TypeReg, Mode: 0o644, Size: 5})
	tw.Write([]byte("tiny\n"))
	tw.Close()
	p := filepath.Join(dir, "tiny.tar")
	os.WriteFile(p, buf.Bytes(), 0o644)
	return "tar:" + p
}

// BenchmarkQueueDispatch: rounds of 1,000 no-op jobs through a pool of two hosts (32 slots each). Each job's
// "VM" is a real virtkit-agent process; its boot time is measured and taken out, leaving the
// dispatch overhead: queue, a host taking the item, image cache hit, events back to the submitter.
func BenchmarkQueueDispatch(b *testing.B) {
	srv, c := brokertest.Start(b, broker.SchemaOptions{})
	dir := b.TempDir()
	m := &timedMachines{Machines: jobstest.NewAgentMachines(b), boots: map[string]time.Duration{}}
	img := tinyImage(b, dir)
	conv := &jobs.Converter{Allowed: jobs.AllowList{"tar:" + dir}, Store: filepath.Join(dir, "images"), Agent: cmdtest.Binary(b, "virtkit-agent")}
	startRunner(b, srv, "ha", 32, m, conv)
	startRunner(b, srv, "hb", 32, m, conv)
	ctx := context.Background()
	// Warm the image cache once; every job after is a cache hit.
	if _, err := conv.Resolve(ctx, img); err != nil {
		b.Fatal(err)
	}
	round := 0
	for _, inflight := range []int{1, 4, 16} {
		b.Run(fmt.Sprintf("inflight=%d", inflight), func(b *testing.B) {
			for b.Loop() {
				round++
				dispatchRound(b, c, m, img, round, inflight)
			}
		})
	}
}

// dispatchRound runs n no-op jobs, inflight at a time (below the pool's 64 slots: waiting for
// capacity is not dispatch overhead), and reports the overhead percentiles.
func dispatchRound(b *testing.B, c *broker.Client, m *timedMachines, img string, round, inflight int) {
	const n = 1000
	ctx := context.Background()
	{
		round++
		var mu sync.Mutex
		var overhead, total []time.Duration
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(inflight)
		t0 := time.Now()
		for i := range n {
			g.Go(func() error {
				id := fmt.Sprintf("r%d-j%04d", round, i)
				s := time.Now()
				pl, err := jobs.Submit(gctx, c, jobs.Spec{ID: id, Image: img})
				if err != nil {
					return err
				}
				d := time.Since(s)
				mu.Lock()
				total = append(total, d)
				overhead = append(overhead, d-m.boot(id))
				mu.Unlock()
				return jobs.Cleanup(gctx, c, pl, false, 0)
			})
		}
		if err := g.Wait(); err != nil {
			b.Fatal(err)
		}
		el := time.Since(t0)
		b.ReportMetric(float64(n)/el.Seconds(), "jobs/s")
		b.ReportMetric(ms(percentile(overhead, 0.50)), "dispatch-p50-ms")
		b.ReportMetric(ms(percentile(overhead, 0.99)), "dispatch-p99-ms")
		b.ReportMetric(ms(percentile(total, 0.99)), "submit-to-ready-p99-ms")
	}
}

// BenchmarkJobOverheadVM: one job at a time on a real microVM (QEMU; TCG where KVM is unusable):
// enqueue → VM ready (boot included), stage dispatch (hook asks → the stage runs in the guest),
// a whole `true` stage as the hook sees it, and cleanup (VM powered off and removed).
func BenchmarkJobOverheadVM(b *testing.B) {
	cmdtest.Heavy(b)
	kernel := cmdtest.Kernel(b)
	tarball := imagetest.DebianRootfs(b) // debootstrap once, cached
	srv, c := brokertest.Start(b, broker.SchemaOptions{})
	dir := b.TempDir()
	lans := launcher.NewLANs(lan.Config{Subnet: netip.MustParsePrefix("10.77.0.0/24")})
	b.Cleanup(lans.Close)
	l, err := launcher.New(launcher.Config{StateDir: dir, Kernel: kernel, Virtkit: cmdtest.Binary(b, "virtkit"), LANs: lans,
		NewDisk: func(ctx context.Context, p string, size int64) error {
			_, err := ext4.WriteEmpty(ctx, p, ext4.Options{Size: size, NoJournal: true})
			return err
		}})
	if err != nil {
		b.Fatal(err)
	}
	m := &timedMachines{Machines: jobs.LauncherMachines{L: l}, boots: map[string]time.Duration{}}
	conv := &jobs.Converter{Allowed: jobs.AllowList{"tar:" + filepath.Dir(tarball)}, Store: filepath.Join(dir, "images"), Agent: cmdtest.Binary(b, "virtkit-agent")}
	startRunner(b, srv, "ha", 1, m, conv)
	ctx := context.Background()
	if _, err := conv.Resolve(ctx, "tar:"+tarball); err != nil {
		b.Fatal(err)
	}
	var ready, boot, dispatch, stage, cleanup []time.Duration
	i := 0
	for b.Loop() {
		i++
		id := fmt.Sprintf("vm%d", i)
		t0 := time.Now()
		pl, err := jobs.Submit(ctx, c, jobs.Spec{ID: id, Image: "tar:" + tarball, MemoryMiB: 256})
		if err != nil {
			b.Fatal(err)
		}
		ready = append(ready, time.Since(t0))
		boot = append(boot, m.boot(id))
		for range 3 {
			t1 := time.Now()
			var started time.Duration
			ex, err := jobs.Exec(ctx, c, pl, "build_script", []byte("true\n"), io.Discard, io.Discard,
				jobs.ExecOptions{OnStarted: func() { started = time.Since(t1) }})
			if err != nil || ex.Code != 0 {
				b.Fatalf("stage: %+v %v", ex, err)
			}
			stage = append(stage, time.Since(t1))
			dispatch = append(dispatch, started)
		}
		t2 := time.Now()
		if err := jobs.Cleanup(ctx, c, pl, false, 0); err != nil {
			b.Fatal(err)
		}
		cleanup = append(cleanup, time.Since(t2))
	}
	b.ReportMetric(ms(percentile(ready, 0.5)), "enqueue-to-ready-ms")
	b.ReportMetric(ms(percentile(boot, 0.5)), "of-which-boot-ms")
	b.ReportMetric(ms(percentile(dispatch, 0.5)), "stage-dispatch-ms")
	b.ReportMetric(ms(percentile(stage, 0.5)), "true-stage-ms")
	b.ReportMetric(ms(percentile(cleanup, 0.5)), "cleanup-ms")
}
