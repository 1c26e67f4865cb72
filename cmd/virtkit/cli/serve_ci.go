package cli

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/virtkit/virtkit/ci/jobs"
	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/switch/lan"
	"github.com/virtkit/virtkit/workers"
	"github.com/virtkit/virtkit/workers/launcher"
)

func init() { registerWorker("ci", newCIWorker) }

// ciWorker takes pooled CI jobs (vk.work.ci.job) on this host. Its VMs live under
// <state>/ci/vms, apart from the launcher worker's, so each reconciles only its own. Everything
// is built in Run, so a one-shot session (which never runs it) pays nothing for it.
type ciWorker struct{ d *daemon }

func newCIWorker(_ context.Context, d *daemon) (workers.Worker, error) { return &ciWorker{d: d}, nil }

func (w *ciWorker) Name() string { return "ci" }

func (w *ciWorker) Run(ctx context.Context) error {
	d, c := w.d, w.d.Config
	log := d.Log.With().Str("worker", "ci").Logger()
	netMode := "dhcp"
	var taps *jobs.TapPool
	if c.Net.Mode == "pool" {
		var err error
		if taps, err = jobs.NewTapPool(c.Net.Taps); err != nil {
			return workers.Fatal(fmt.Errorf("ci: %w", err))
		}
		for _, t := range c.Net.Taps {
			if _, err := os.Stat(filepath.Join("/sys/class/net", t)); err != nil {
				return workers.Fatal(fmt.Errorf(`ci: net.taps: %s does not exist (create the pool's taps first, see deploy/tap-pool.sh)`, t))
			}
		}
		if taps.Size() < c.VM.Capacity {
			log.Warn().Int("taps", taps.Size()).Int("capacity", c.VM.Capacity).Msg("fewer pool taps than vm.capacity: jobs beyond the taps fail as system failures")
		}
		netMode = "pool"
	}
	subnet, err := netip.ParsePrefix(c.Net.Subnet)
	if err != nil {
		return workers.Fatal(fmt.Errorf("ci: net.subnet %q: %w", c.Net.Subnet, err))
	}
	lans := launcher.NewLANs(lan.Config{Subnet: subnet, Logger: d.Log})
	defer lans.Close()
	l, err := launcher.New(launcher.Config{
		StateDir: filepath.Join(c.StateDir, "ci"),
		Kernel:   kernelPath(c.VM.Kernel),
		VMM:      c.VM.VMM,
		NewDisk:  newOverlayDisk,
		LANs:     lans,
		Logger:   d.Log,
	})
	if err != nil {
		return workers.Fatal(fmt.Errorf("ci: %w", err))
	}
	agent, err := oci.FindAgent()
	if err != nil {
		return workers.Fatal(fmt.Errorf("ci: %w", err))
	}
	r, err := jobs.New(jobs.Config{
		Client:   d.Client,
		Slots:    d.Slots,
		Machines: jobs.LauncherMachines{L: l},
		Images: &jobs.Converter{
			Allowed: jobs.AllowList(c.CI.AllowedRegistries),
			Options: oci.Options{CacheDir: filepath.Join(c.CacheDir, "layers"), Log: log},
			Store:   filepath.Join(c.StateDir, "images"),
			Agent:   agent,
			Log:     log,
		},
		JobTimeout:   time.Duration(c.CI.JobTimeoutSec) * time.Second,
		CPUs:         c.VM.CPUs,
		MemoryMiB:    c.VM.MemoryMiB,
		MaxCPUs:      c.VM.MaxCPUs,
		MaxMemoryMiB: c.VM.MaxMemoryMiB,
		Net:          netMode,
		Taps:         taps,
		Log:          log,
	})
	if err != nil {
		return workers.Fatal(err)
	}
	left, err := l.Reconcile(ctx)
	if err != nil {
		return err
	}
	for _, lo := range left {
		log.Warn().Str("vm", lo.Name).Ints("killed", lo.Killed).Msg("reaped a CI VM left by a previous virtkit")
	}
	return r.Run(ctx)
}
