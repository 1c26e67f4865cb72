package cli

import (
	"context"
	"path/filepath"

	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/workers"
	"github.com/virtkit/virtkit/workers/converter"
)

func init() { registerWorker("converter", newConverterWorker) }

// newConverterWorker converts images for the fleet (vk.work.image.convert). Without a
// virtkit-agent to inject (none next to virtkit nor on $PATH) this host takes no conversions: it
// says so and leaves the work to hosts that can.
func newConverterWorker(ctx context.Context, d *daemon) (workers.Worker, error) {
	agent, err := oci.FindAgent()
	if err != nil {
		d.Log.Warn().Err(err).Msg("converter worker not started")
		return nil, nil
	}
	return converter.New(converter.Config{
		Client: d.Client,
		Slots:  d.Slots,
		Convert: oci.ConvertOptions{
			Options: oci.Options{CacheDir: filepath.Join(d.Config.CacheDir, "layers"), Log: d.Log},
			Store:   filepath.Join(d.Config.StateDir, "images"),
			Agent:   agent,
		},
		Log: d.Log,
	})
}
