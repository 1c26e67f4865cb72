package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/workers/launcher"
)

func nonce() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// followVM subscribes to VM name's new events before work is submitted, so none is missed.
func followVM(ctx context.Context, c *broker.Client, name string) (<-chan broker.Event, func(), error) {
	ch := make(chan broker.Event, 16)
	sub, err := c.Subscribe(ctx, broker.SubscribeOptions{Filters: []string{broker.EventFilter("vm", name, "")}, New: true},
		func(ctx context.Context, _ *broker.Envelope, ev broker.Event) error {
			select {
			case ch <- ev:
			case <-ctx.Done():
			}
			return nil
		})
	if err != nil {
		return nil, nil, err
	}
	return ch, sub.Stop, nil
}

// launchVM asks this host's launcher to boot req and waits for vm.ready or vm.failed.
func launchVM(ctx context.Context, c *broker.Client, req launcher.Request) (*broker.VMReady, error) {
	evs, stop, err := followVM(ctx, c, req.Name)
	if err != nil {
		return nil, err
	}
	defer stop()
	if _, err := c.Submit(ctx, broker.HostWorkSubject(c.Host(), launcher.KindLaunch), "launch-"+req.Name+"-"+nonce(), req); err != nil {
		return nil, err
	}
	for {
		select {
		case ev := <-evs:
			switch e := ev.(type) {
			case *broker.VMReady:
				return e, nil
			case *broker.VMFailed:
				return nil, errors.New(e.Error)
			case *broker.VMStopped:
				return nil, fmt.Errorf("vm %s stopped while booting: %s", req.Name, e.Reason)
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("vm %s: waiting for it to boot: %w", req.Name, ctx.Err())
		}
	}
}

// stopVM asks the host running VM name to stop it and waits until it has.
func stopVM(ctx context.Context, c *broker.Client, host, name string, kill bool) (*broker.VMStopped, error) {
	evs, stop, err := followVM(ctx, c, name)
	if err != nil {
		return nil, err
	}
	defer stop()
	if _, err := c.Submit(ctx, broker.HostWorkSubject(host, launcher.KindStop), "stop-"+name+"-"+nonce(), launcher.StopRequest{Name: name, Kill: kill}); err != nil {
		return nil, err
	}
	for {
		select {
		case ev := <-evs:
			switch e := ev.(type) {
			case *broker.VMStopped:
				return e, nil
			case *broker.VMFailed:
				return nil, errors.New(e.Error)
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("vm %s: waiting for it to stop: %w", name, ctx.Err())
		}
	}
}
