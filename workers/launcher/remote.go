package launcher

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/virtkit/virtkit/broker"
)

// The client side of the launcher worker: boot or stop a VM through the broker and wait for the
// outcome in the event log. Used by `virtkit run`/`vm`, the fleet controller and the CI runner.

// Launch asks host's launcher to boot req and waits for vm.ready (returned) or vm.failed.
func Launch(ctx context.Context, c *broker.Client, host string, req Request) (*broker.VMReady, error) {
	evs, stop, err := follow(ctx, c, req.Name)
	if err != nil {
		return nil, err
	}
	defer stop()
	if _, err := c.Submit(ctx, broker.HostWorkSubject(host, KindLaunch), "launch-"+req.Name+"-"+nonce(), req); err != nil {
		return nil, err
	}
	// The end of a previous VM of the same name may still be published after the submit (the
	// launcher waits for it before booting this one): only what follows vm.starting is ours.
	started := false
	for {
		select {
		case ev := <-evs:
			if !started {
				switch e := ev.(type) {
				case *broker.VMStarting:
					started = true
				case *broker.VMRefused:
					return nil, errors.New(e.Error)
				}
				continue
			}
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

// Stop asks host's launcher to stop VM name (kill: at once) and waits until it has.
func Stop(ctx context.Context, c *broker.Client, host, name string, kill bool) (*broker.VMStopped, error) {
	evs, stop, err := follow(ctx, c, name)
	if err != nil {
		return nil, err
	}
	defer stop()
	if _, err := c.Submit(ctx, broker.HostWorkSubject(host, KindStop), "stop-"+name+"-"+nonce(), StopRequest{Name: name, Kill: kill}); err != nil {
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

// follow subscribes to VM name's new events before work is submitted, so none is missed.
func follow(ctx context.Context, c *broker.Client, name string) (<-chan broker.Event, func(), error) {
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

func nonce() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}
