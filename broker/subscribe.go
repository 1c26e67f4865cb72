package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// EventFilter is a subject filter on VIRTKIT_EVENTS; an empty part matches anything:
// EventFilter("vm", "web1", "") is vk.evt.vm.web1.*.
func EventFilter(aggregate, id, name string) string {
	star := func(s string) string {
		if s == "" {
			return "*"
		}
		return s
	}
	if aggregate == "" && id == "" && name == "" {
		return EventSubjectPrefix + ">"
	}
	return EventSubjectPrefix + star(aggregate) + "." + star(id) + "." + star(name)
}

// SubscribeOptions choose which events a subscription sees and from where.
type SubscribeOptions struct {
	// Filters are subject filters (EventFilter); none means every event.
	Filters []string
	// From where to start: by default the whole log; StartSeq or StartTime start later, and New
	// delivers only events published after the subscription starts.
	StartSeq  uint64
	StartTime time.Time
	New       bool
}

// EventHandler handles one event. Returning an error ends the subscription with that error.
type EventHandler func(ctx context.Context, env *Envelope, ev Event) error

// Subscription follows the event log in order. Stop ends it at once, Drain after the events
// already received are handled; Closed is closed when the handler is no longer called.
type Subscription struct {
	it     jetstream.MessagesContext
	cancel context.CancelFunc
	closed chan struct{}
	mu     sync.Mutex
	err    error
}

// LastEventSeq is the sequence of the newest event in the log (0 when empty). To follow what a
// request causes without a gap: take LastEventSeq, submit the request, then Subscribe with
// StartSeq = that + 1.
func (c *Client) LastEventSeq(ctx context.Context) (uint64, error) {
	st, err := c.js.Stream(ctx, EventsStream)
	if err != nil {
		return 0, fmt.Errorf("broker: last event: %w", err)
	}
	return st.CachedInfo().State.LastSeq, nil
}

// Subscribe calls h for every matching event, in log order, from one goroutine. It uses an
// ordered consumer: no server state to clean up, and it resumes after a reconnect without gaps.
// Envelopes of unknown types (from newer peers) are skipped.
func (c *Client) Subscribe(ctx context.Context, o SubscribeOptions, h EventHandler) (*Subscription, error) {
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: o.Filters}
	switch {
	case o.New:
		cfg.DeliverPolicy = jetstream.DeliverNewPolicy
	case o.StartSeq > 0:
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = o.StartSeq
	case !o.StartTime.IsZero():
		cfg.DeliverPolicy = jetstream.DeliverByStartTimePolicy
		t := o.StartTime
		cfg.OptStartTime = &t
	}
	cons, err := c.js.OrderedConsumer(ctx, EventsStream, cfg)
	if err != nil {
		return nil, fmt.Errorf("broker: subscribe: %w", err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(512))
	if err != nil {
		return nil, fmt.Errorf("broker: subscribe: %w", err)
	}
	hctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s := &Subscription{it: it, cancel: cancel, closed: make(chan struct{})}
	go func() {
		defer close(s.closed)
		defer cancel()
		for {
			msg, err := it.Next()
			if err != nil {
				if !errors.Is(err, jetstream.ErrMsgIteratorClosed) {
					s.setErr(fmt.Errorf("broker: subscription: %w", err))
				}
				return
			}
			env, ev, err := decodeMsg(msg)
			if err != nil {
				c.log.Warn().Err(err).Str("subject", msg.Subject()).Msg("broker: skip event")
				continue
			}
			if err := h(hctx, env, ev); err != nil {
				s.setErr(err)
				it.Stop()
				return
			}
		}
	}()
	// The subscription follows ctx: when it ends, stop.
	go func() {
		select {
		case <-ctx.Done():
			it.Stop()
		case <-s.closed:
		}
	}()
	return s, nil
}

func decodeMsg(msg jetstream.Msg) (*Envelope, Event, error) {
	env, err := DecodeEnvelope(msg.Data(), msg.Subject())
	if err != nil {
		return nil, nil, err
	}
	if md, err := msg.Metadata(); err == nil {
		env.Seq = md.Sequence.Stream
	}
	ev, err := env.Event()
	if err != nil {
		return env, nil, err
	}
	return env, ev, nil
}

func (s *Subscription) setErr(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
}

// Stop ends the subscription now; the handler may be running one last event.
func (s *Subscription) Stop() { s.it.Stop(); s.cancel() }

// Drain stops fetching and lets the handler finish the events already buffered.
func (s *Subscription) Drain() { s.it.Drain() }

// Closed is closed once the handler will not be called again.
func (s *Subscription) Closed() <-chan struct{} { return s.closed }

// Err is why the subscription ended (nil after Stop or Drain).
func (s *Subscription) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}
