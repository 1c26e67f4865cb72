package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// PublishOption adjusts one event publish.
type PublishOption func(*publishOpts)

type publishOpts struct {
	ttl time.Duration
}

// WithTTL makes the event expire from the log after d (heartbeats); it is then as if it never
// happened for replays too.
func WithTTL(d time.Duration) PublishOption { return func(o *publishOpts) { o.ttl = d } }

// Publish wraps ev in a new envelope from this host and stores it in VIRTKIT_EVENTS. The returned
// envelope carries the stream sequence; publish it again with PublishEnvelope to retry safely.
func (c *Client) Publish(ctx context.Context, ev Event, opts ...PublishOption) (*Envelope, error) {
	env, err := NewEnvelope(c.host, ev)
	if err != nil {
		return nil, err
	}
	if _, err := c.PublishEnvelope(ctx, env, opts...); err != nil {
		return env, err
	}
	return env, nil
}

// PublishEnvelope stores env with Nats-Msg-Id = env.ID, so a retry of the same envelope within
// the dedupe window is stored once (the ack then says Duplicate). It sets env.Seq.
func (c *Client) PublishEnvelope(ctx context.Context, env *Envelope, opts ...PublishOption) (*jetstream.PubAck, error) {
	msg, jopts, err := envelopeMsg(env, opts)
	if err != nil {
		return nil, err
	}
	jopts = append(jopts, jetstream.WithRetryAttempts(20), jetstream.WithRetryWait(250*time.Millisecond))
	ack, err := c.js.PublishMsg(ctx, msg, jopts...)
	if err != nil {
		return nil, fmt.Errorf("broker: publish %s %s: %w", env.Type, env.ID, err)
	}
	env.Seq = ack.Sequence
	return ack, nil
}

func envelopeMsg(env *Envelope, opts []PublishOption) (*nats.Msg, []jetstream.PublishOpt, error) {
	var po publishOpts
	for _, o := range opts {
		o(&po)
	}
	data, err := env.Marshal()
	if err != nil {
		return nil, nil, fmt.Errorf("broker: publish %s: %w", env.Type, err)
	}
	msg := nats.NewMsg(env.NATSSubject())
	msg.Data = data
	jopts := []jetstream.PublishOpt{jetstream.WithMsgID(env.ID), jetstream.WithExpectStream(EventsStream)}
	if po.ttl > 0 {
		jopts = append(jopts, jetstream.WithMsgTTL(po.ttl))
	}
	return msg, jopts, nil
}

// Batch publishes many envelopes with pipelined acks: far faster than one PublishEnvelope at a
// time. It is safe for concurrent use. Wait returns the first error once all acks are in.
type Batch struct {
	c    *Client
	mu   sync.Mutex
	futs []pending
}

type pending struct {
	env *Envelope
	fut jetstream.PubAckFuture
}

// NewBatch starts a batch of asynchronous publishes.
func (c *Client) NewBatch() *Batch { return &Batch{c: c} }

// Add publishes env without waiting for its ack.
func (b *Batch) Add(env *Envelope, opts ...PublishOption) error {
	msg, jopts, err := envelopeMsg(env, opts)
	if err != nil {
		return err
	}
	fut, err := b.c.js.PublishMsgAsync(msg, jopts...)
	if err != nil {
		return fmt.Errorf("broker: publish %s %s: %w", env.Type, env.ID, err)
	}
	b.mu.Lock()
	b.futs = append(b.futs, pending{env, fut})
	b.mu.Unlock()
	return nil
}

// Wait waits for every ack (setting each envelope's Seq) and returns the number of duplicates
// and the first error. Failed envelopes can be added again: that is a safe retry.
func (b *Batch) Wait(ctx context.Context) (dups int, err error) {
	b.mu.Lock()
	futs := b.futs
	b.futs = nil
	b.mu.Unlock()
	var errs []error
	for _, p := range futs {
		select {
		case ack := <-p.fut.Ok():
			p.env.Seq = ack.Sequence
			if ack.Duplicate {
				dups++
			}
		case e := <-p.fut.Err():
			errs = append(errs, fmt.Errorf("broker: publish %s %s: %w", p.env.Type, p.env.ID, e))
		case <-ctx.Done():
			return dups, fmt.Errorf("broker: wait for acks: %w", ctx.Err())
		}
	}
	return dups, errors.Join(errs...)
}
