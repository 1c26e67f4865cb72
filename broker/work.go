package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// Headers on work messages besides Nats-Msg-Id (the work id).
const (
	HeaderSource    = "Vk-Source"
	HeaderSubmitted = "Vk-Submitted"
)

// Submit queues one work item on subject (WorkImageConvert, WorkVMLaunch, WorkCIJob or a
// HostWorkSubject). id is its Nats-Msg-Id: submitting the same id again within the dedupe window
// queues it once. body is encoded as JSON.
func (c *Client) Submit(ctx context.Context, subject, id string, body any) (*jetstream.PubAck, error) {
	if !strings.HasPrefix(subject, WorkSubjectPrefix) {
		return nil, fmt.Errorf("broker: submit: subject %q is not under %s", subject, WorkSubjectPrefix)
	}
	if id == "" {
		return nil, fmt.Errorf("broker: submit %s: empty work id", subject)
	}
	data, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("broker: submit %s %s: %w", subject, id, err)
	}
	msg := nats.NewMsg(subject)
	msg.Data = data
	msg.Header.Set(HeaderSource, c.host)
	msg.Header.Set(HeaderSubmitted, time.Now().UTC().Format(time.RFC3339Nano))
	ack, err := c.js.PublishMsg(ctx, msg, jetstream.WithMsgID(id), jetstream.WithExpectStream(WorkStream),
		jetstream.WithRetryAttempts(20), jetstream.WithRetryWait(250*time.Millisecond))
	if err != nil {
		return nil, fmt.Errorf("broker: submit %s %s: %w", subject, id, err)
	}
	return ack, nil
}

// Slots is a host's capacity: how many work items it runs at once, shared by all its work
// consumers. The work helpers fetch only as many items as there are free slots, so a host never
// holds (unacked) more work than it can run and the rest stays available to other hosts. It is
// safe for concurrent use.
type Slots struct {
	mu       sync.Mutex
	capacity int
	used     int
	changed  chan struct{}
	// reserving counts waiting Reserve calls; Acquire yields to them.
	reserving int
}

// NewSlots returns n free slots.
func NewSlots(n int) *Slots { return &Slots{capacity: n, changed: make(chan struct{})} }

// SetCapacity changes the number of slots; lowering it below InUse lets running work finish.
func (s *Slots) SetCapacity(n int) {
	s.mu.Lock()
	s.capacity = n
	s.signal()
	s.mu.Unlock()
}

// Capacity is the number of slots.
func (s *Slots) Capacity() int { s.mu.Lock(); defer s.mu.Unlock(); return s.capacity }

// InUse is the number of slots taken.
func (s *Slots) InUse() int { s.mu.Lock(); defer s.mu.Unlock(); return s.used }

// Free is the number of slots available.
func (s *Slots) Free() int { s.mu.Lock(); defer s.mu.Unlock(); return max(0, s.capacity-s.used) }

func (s *Slots) signal() { close(s.changed); s.changed = make(chan struct{}) }

// Acquire waits until at least one slot is free (and no Reserve waits) and takes up to n of them.
func (s *Slots) Acquire(ctx context.Context, n int) (int, error) {
	for {
		s.mu.Lock()
		if free := s.capacity - s.used; free > 0 && s.reserving == 0 {
			k := min(free, n)
			s.used += k
			s.signal()
			s.mu.Unlock()
			return k, nil
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// Reserve waits until n slots are free and takes them all at once. It goes ahead of Acquire:
// while a Reserve waits, Acquire takes nothing, so work already running can grow (a CI job's
// service VMs) before more work is fetched. Callers bound the wait with ctx: two Reserves that
// each wait for slots the other holds only end with it.
func (s *Slots) Reserve(ctx context.Context, n int) error {
	if n <= 0 {
		return nil
	}
	s.mu.Lock()
	s.reserving++
	defer func() {
		s.mu.Lock()
		s.reserving--
		s.signal()
		s.mu.Unlock()
	}()
	for {
		if s.capacity-s.used >= n {
			s.used += n
			s.signal()
			s.mu.Unlock()
			return nil
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
		s.mu.Lock()
	}
}

// Release gives back n slots.
func (s *Slots) Release(n int) {
	if n == 0 {
		return
	}
	s.mu.Lock()
	s.used -= n
	if s.used < 0 {
		panic("broker: Slots released more than acquired")
	}
	s.signal()
	s.mu.Unlock()
}

// Work is one work item handed to a WorkHandler.
type Work struct {
	// ID is the Nats-Msg-Id it was submitted with.
	ID      string
	Subject string
	Data    []byte
	// Source is the host that submitted it.
	Source string
	// Attempt is 1 on first delivery, more on redelivery (a failed try, or a host that died).
	Attempt int
	msg     jetstream.Msg
}

// Decode unmarshals the JSON body into v; a malformed body is a Permanent error.
func (w *Work) Decode(v any) error {
	if err := json.Unmarshal(w.Data, v); err != nil {
		return Permanent(fmt.Errorf("broker: work %s on %s: bad body: %w", w.ID, w.Subject, err))
	}
	return nil
}

// WorkHandler does one work item. Returning nil acks it (done, never redelivered). Returning a
// Permanent error terminates it. Any other error asks for a retry after a back-off, possibly on
// another host. Handlers must be idempotent: an item whose ack was lost, or whose host died, is
// delivered again.
type WorkHandler func(ctx context.Context, w *Work) error

// WorkOptions configure ConsumeWork.
type WorkOptions struct {
	// Subject is a shared work subject (WorkImageConvert, WorkVMLaunch, WorkCIJob) or this host's
	// HostWorkSubject(host, ">").
	Subject string
	// Slots is the host's capacity; required.
	Slots *Slots
	// Grace is how long in-flight work may run after Drain (or the end of ctx) before its ctx is
	// canceled and the item handed back for redelivery. Default 30s.
	Grace time.Duration
	// Log, with the zero logger discarding.
	Log zerolog.Logger
}

// WorkConsumer is a running work-queue consumer. Drain stops taking work and lets in-flight
// items finish (within Grace); Stop also cancels in-flight handlers at once. Work that does not
// finish is negatively acknowledged, so it is redelivered, never half-done and acked.
type WorkConsumer struct {
	stopFetch context.CancelFunc
	cancel    context.CancelFunc
	grace     time.Duration
	closed    chan struct{}
	once      sync.Once
}

// ConsumeWork starts taking items from the work queue for Subject. The durable consumer of a
// shared subject is the one Provision declared; a host subject's consumer is created here.
func (c *Client) ConsumeWork(ctx context.Context, o WorkOptions, h WorkHandler) (*WorkConsumer, error) {
	if o.Slots == nil {
		return nil, errors.New("broker: consume work: nil Slots")
	}
	if o.Grace == 0 {
		o.Grace = 30 * time.Second
	}
	name := WorkConsumerName(o.Subject)
	cons, err := c.js.Consumer(ctx, WorkStream, name)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		cons, err = c.js.CreateOrUpdateConsumer(ctx, WorkStream, WorkConsumerConfig(o.Subject, SchemaOptions{}))
	}
	if err != nil {
		return nil, fmt.Errorf("broker: consume work %s: %w", o.Subject, err)
	}
	ackWait := cons.CachedInfo().Config.AckWait
	if ackWait <= 0 {
		ackWait = 30 * time.Second
	}
	fetchCtx, stopFetch := context.WithCancel(context.WithoutCancel(ctx))
	workCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	wc := &WorkConsumer{stopFetch: stopFetch, cancel: cancel, grace: o.Grace, closed: make(chan struct{})}
	log := o.Log.With().Str("work", o.Subject).Logger()

	var inflight sync.WaitGroup
	handle := func(msg jetstream.Msg) {
		defer inflight.Done()
		defer o.Slots.Release(1)
		w := &Work{ID: msg.Headers().Get(jetstream.MsgIDHeader), Subject: msg.Subject(), Data: msg.Data(), Source: msg.Headers().Get(HeaderSource), msg: msg}
		if md, err := msg.Metadata(); err == nil {
			w.Attempt = int(md.NumDelivered)
		}
		// Tell the server the item is being worked on, so it is not redelivered while this host
		// lives; if the host dies the reports stop and AckWait later the item goes elsewhere.
		tick := time.NewTicker(ackWait / 3)
		done := make(chan struct{})
		go func() {
			for {
				select {
				case <-tick.C:
					_ = msg.InProgress()
				case <-done:
					return
				}
			}
		}()
		err := runHandler(workCtx, h, w)
		tick.Stop()
		close(done)
		l := log.With().Str("id", w.ID).Int("attempt", w.Attempt).Logger()
		actx, acancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer acancel()
		switch {
		case err == nil:
			if aerr := msg.DoubleAck(actx); aerr != nil {
				l.Warn().Err(aerr).Msg("work done but its ack was not confirmed; it may be redelivered")
			}
		case workCtx.Err() != nil:
			l.Info().Err(err).Msg("work interrupted by shutdown; handing it back")
			_ = msg.Nak()
		case IsPermanent(err):
			l.Error().Err(err).Msg("work failed permanently")
			_ = msg.TermWithReason(truncate(err.Error(), 256))
		default:
			delay := min(time.Duration(1<<min(w.Attempt, 6))*time.Second, time.Minute)
			l.Warn().Err(err).Dur("retry_in", delay).Msg("work failed; will retry")
			_ = msg.NakWithDelay(delay)
		}
	}

	go func() {
		defer close(wc.closed)
		defer inflight.Wait()
		for {
			n, err := o.Slots.Acquire(fetchCtx, 64)
			if err != nil {
				return
			}
			batch, err := cons.Fetch(n, jetstream.FetchMaxWait(time.Second))
			if err != nil {
				o.Slots.Release(n)
				if fetchCtx.Err() != nil {
					return
				}
				log.Warn().Err(err).Msg("fetch work")
				select {
				case <-time.After(time.Second):
				case <-fetchCtx.Done():
					return
				}
				continue
			}
			got := 0
			for msg := range batch.Messages() {
				got++
				inflight.Add(1)
				go handle(msg)
			}
			o.Slots.Release(n - got)
			if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, jetstream.ErrNoMessages) && fetchCtx.Err() == nil {
				log.Debug().Err(err).Msg("fetch work")
			}
			if fetchCtx.Err() != nil {
				return
			}
		}
	}()
	go func() {
		select {
		case <-ctx.Done():
			wc.Drain()
		case <-wc.closed:
		}
	}()
	return wc, nil
}

func runHandler(ctx context.Context, h WorkHandler, w *Work) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("broker: work handler for %s panicked: %v", w.Subject, r)
		}
	}()
	return h(ctx, w)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// Drain stops taking work; in-flight items get Grace to finish before they are canceled.
func (wc *WorkConsumer) Drain() {
	wc.once.Do(func() {
		wc.stopFetch()
		go func() {
			select {
			case <-time.After(wc.grace):
				wc.cancel()
			case <-wc.closed:
			}
		}()
	})
}

// Stop stops taking work and cancels in-flight handlers now; their items are handed back.
func (wc *WorkConsumer) Stop() {
	wc.stopFetch()
	wc.cancel()
}

// Closed is closed when no handler runs any more and every item was acked or handed back.
func (wc *WorkConsumer) Closed() <-chan struct{} { return wc.closed }

// RunWork consumes work until ctx ends, then drains: the body of a work-queue Worker's Run.
func (c *Client) RunWork(ctx context.Context, o WorkOptions, h WorkHandler) error {
	wc, err := c.ConsumeWork(ctx, o, h)
	if err != nil {
		return err
	}
	<-ctx.Done()
	wc.Drain()
	<-wc.Closed()
	return nil
}
