package cli

import (
	"context"
	"path/filepath"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/cmd/virtkit/config"
	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/workers"
	"github.com/virtkit/virtkit/workers/fleet"
)

func init() { registerWorker("fleet", newFleetWorker) }

// newFleetWorker serves virtctl (guest→host vsock port 1099) for fleet VMs on this host and
// resumes the applied fleets when the daemon starts.
func newFleetWorker(ctx context.Context, d *daemon) (workers.Worker, error) {
	return fleet.NewControlServer(fleetController(d.Config, d.Client, d.Log, oci.Options{}), d.Client, d.Log), nil
}

// fleetController wires the fleet controller to this host's image store and volume writer.
func fleetController(cfg *config.Config, c *broker.Client, log zerolog.Logger, opts oci.Options) *fleet.Controller {
	if opts.CacheDir == "" {
		opts.CacheDir = filepath.Join(cfg.CacheDir, "layers")
	}
	if opts.Pull == "" {
		opts.Pull = oci.PullMissing
	}
	opts.Log = log
	return fleet.NewController(fleet.ControllerConfig{
		Client:   c,
		StateDir: cfg.StateDir,
		Convert: func(ctx context.Context, ref string) (fleet.Image, error) {
			agent, err := oci.FindAgent()
			if err != nil {
				return fleet.Image{}, err
			}
			b, err := oci.Convert(ctx, ref, oci.ConvertOptions{Options: opts, Store: filepath.Join(cfg.StateDir, "images"), Agent: agent, NoJournal: true})
			if err != nil {
				return fleet.Image{}, err
			}
			im := b.Image
			return fleet.Image{Rootfs: b.Rootfs, Entrypoint: im.Entrypoint, Cmd: im.Cmd, Env: im.Env, WorkingDir: im.WorkingDir, User: im.User}, nil
		},
		NewVolume: func(ctx context.Context, path string, size int64) error {
			_, err := ext4.WriteEmpty(ctx, path, ext4.Options{Size: size, Label: "vk-volume"})
			return err
		},
		CPUs:      cfg.VM.CPUs,
		MemoryMiB: cfg.VM.MemoryMiB,
		Log:       log,
	})
}
