package cli

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/switch/lan"
	"github.com/virtkit/virtkit/workers"
	"github.com/virtkit/virtkit/workers/launcher"
)

func init() { registerWorker("launcher", newLauncherWorker) }

// newLauncherWorker runs VMs on this host: the launcher with its LANs, as a broker worker.
func newLauncherWorker(ctx context.Context, d *daemon) (workers.Worker, error) {
	c := d.Config
	subnet, err := netip.ParsePrefix(c.Net.Subnet)
	if err != nil {
		return nil, fmt.Errorf("net.subnet %q: %w", c.Net.Subnet, err)
	}
	base := lan.Config{Subnet: subnet, AllowHostLoopback: c.Net.AllowHostLoopback, Logger: d.Log}
	for _, list := range []struct {
		key string
		in  []string
		out *[]netip.Prefix
	}{{"net.allow", c.Net.Allow, &base.Allow}, {"net.deny", c.Net.Deny, &base.Deny}} {
		for _, s := range list.in {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, fmt.Errorf("%s %q: %w", list.key, s, err)
			}
			*list.out = append(*list.out, p)
		}
	}
	l, err := launcher.New(launcher.Config{
		StateDir: c.StateDir,
		Kernel:   kernelPath(c.VM.Kernel),
		VMM:      c.VM.VMM,
		NewDisk:  newOverlayDisk,
		LANs:     launcher.NewLANs(base),
		Logger:   d.Log,
	})
	if err != nil {
		return nil, err
	}
	return launcher.NewWorker(l, d.Client, d.Slots, d.Log), nil
}

// newOverlayDisk makes a VM's throwaway writable layer: sparse, no journal.
func newOverlayDisk(ctx context.Context, path string, size int64) error {
	_, err := ext4.WriteEmpty(ctx, path, ext4.Options{Size: size, NoJournal: true, Label: "vk-overlay"})
	return err
}
