package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/workers/launcher"
)

func nonce() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// launchVM asks this host's launcher to boot req and waits for vm.ready or vm.failed.
func launchVM(ctx context.Context, c *broker.Client, req launcher.Request) (*broker.VMReady, error) {
	return launcher.Launch(ctx, c, c.Host(), req)
}

// stopVM asks the host running VM name to stop it and waits until it has.
func stopVM(ctx context.Context, c *broker.Client, host, name string, kill bool) (*broker.VMStopped, error) {
	return launcher.Stop(ctx, c, host, name, kill)
}
