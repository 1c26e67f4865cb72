package jobs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtkit/virtkit/broker"
)

// Submit queues spec on the pool and waits until a host has booted its VM (job.started), the job
// failed to start (job.failed: a *Failure, system or not) or ctx ends.
func Submit(ctx context.Context, c *broker.Client, spec Spec) (*Placement, error) {
	if err := spec.Validate(); err != nil {
		return nil, &Failure{Msg: err.Error()}
	}
	// A core subscription sees the job's events as they are stored, without the cost of a
	// JetStream consumer per job; a poll of the stream covers what a reconnect could drop.
	evs := make(chan broker.Event, 8)
	sub, err := c.Conn().Subscribe(broker.EventFilter("job", spec.ID, ""), func(m *nats.Msg) {
		if ev := decodeEvent(m.Data, m.Subject); ev != nil {
			select {
			case evs <- ev:
			default:
			}
		}
	})
	if err != nil {
		return nil, fmt.Errorf("jobs: submit %s: %w", spec.ID, err)
	}
	defer sub.Unsubscribe()
	// No flush: the server handles this connection's subscription before the publishes that
	// follow it, so it is in place before any host can see the job (a cluster's other nodes learn
	// of it asynchronously either way; the poll below covers that).
	p := &Placement{Job: spec.ID, Queued: time.Now()}
	// job.queued goes out ahead of the work item on this connection, without waiting for its ack
	// in between (a host needs a boot's time before its job.started can follow it); its ack is
	// checked once the item is queued, and a failed one published again (same id: stored once).
	queued, err := broker.NewEnvelope(c.Host(), &broker.JobQueued{Job: spec.ID, Image: spec.Image, Origin: spec.Origin})
	if err != nil {
		return nil, fmt.Errorf("jobs: submit %s: %w", spec.ID, err)
	}
	batch := c.NewBatch()
	if err := batch.Add(queued); err != nil {
		return nil, fmt.Errorf("jobs: submit %s: %w", spec.ID, err)
	}
	ack, err := c.Submit(ctx, broker.WorkCIJob, spec.ID, spec)
	if err != nil {
		batch.Wait(ctx)
		return nil, fmt.Errorf("jobs: submit %s: %w", spec.ID, err)
	}
	if _, err := batch.Wait(ctx); err != nil {
		if _, err := c.PublishEnvelope(ctx, queued); err != nil {
			abandon(c, spec.ID, ack.Sequence)
			return nil, fmt.Errorf("jobs: submit %s: %w", spec.ID, err)
		}
	}
	poll := time.NewTicker(2 * time.Second)
	defer poll.Stop()
	for {
		var ev broker.Event
		select {
		case ev = <-evs:
		case <-poll.C:
			ev = lastOutcome(ctx, c, spec.ID)
		case <-ctx.Done():
			abandon(c, spec.ID, ack.Sequence)
			return nil, fmt.Errorf("jobs: job %s: waiting for a host to start it: %w", spec.ID, ctx.Err())
		}
		{
			switch e := ev.(type) {
			case *broker.JobStarted:
				p.Host, p.VM, p.Ready = e.Host, e.VM, time.Now()
				return p, nil
			case *broker.JobFailed:
				return nil, &Failure{System: e.System, Msg: e.Error}
			case *broker.JobCanceled:
				return nil, &Failure{System: true, Msg: "canceled: " + e.Reason}
			}
		}
	}
}

func decodeEvent(data []byte, subject string) broker.Event {
	env, err := broker.DecodeEnvelope(data, subject)
	if err != nil {
		return nil
	}
	ev, err := env.Event()
	if err != nil {
		return nil
	}
	return ev
}

// lastOutcome reads the job's stored outcome so far (started, failed or canceled), if any.
func lastOutcome(ctx context.Context, c *broker.Client, id string) broker.Event {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := c.JetStream().Stream(ctx, broker.EventsStream)
	if err != nil {
		return nil
	}
	for _, name := range []string{"failed", "canceled", "started"} {
		if m, err := st.GetLastMsgForSubject(ctx, broker.EventFilter("job", id, name)); err == nil {
			if ev := decodeEvent(m.Data, m.Subject); ev != nil {
				return ev
			}
		}
	}
	return nil
}

// ExecOptions tune Exec.
type ExecOptions struct {
	// Signals delivers signals to forward to the guest command (SIGTERM, SIGKILL, …).
	Signals <-chan syscall.Signal
	// KeepAlive is the interval of keep-alives to the host; default 1 s.
	KeepAlive time.Duration
	// HostTimeout is how long the host may leave keep-alives unanswered before the stage is
	// given up as a system failure (the host died); default 20 s.
	HostTimeout time.Duration
	// Env is KEY=VALUE for the stage.
	Env []string
	// OnStarted, when set, is called once the host accepted the stage (for latency measurements).
	OnStarted func()
}

// Exec runs script as stage in the job VM that p names, streaming its output to stdout and
// stderr as it comes. It returns the command's exit (code 0 is success); an error wrapping
// ErrSystem when the host, VM or broker failed.
func Exec(ctx context.Context, c *broker.Client, p *Placement, stage string, script []byte, stdout, stderr io.Writer, o ExecOptions) (Exit, error) {
	if o.KeepAlive <= 0 {
		o.KeepAlive = time.Second
	}
	if o.HostTimeout <= 0 {
		o.HostTimeout = 20 * time.Second
	}
	if len(script) > MaxScript {
		return Exit{}, &Failure{Msg: fmt.Sprintf("stage %s: script of %d bytes is larger than %d", stage, len(script), MaxScript)}
	}
	id := p.Job + "-" + nonce()
	sysErr := func(format string, args ...any) (Exit, error) {
		return Exit{}, &Failure{System: true, Msg: fmt.Sprintf("stage %s of job %s on host %s: ", stage, p.Job, p.Host) + fmt.Sprintf(format, args...)}
	}
	// Follow the output while asking: the stream keeps every message of this exec from the
	// first, so the consumer may start after the stage did (it replays what came before).
	type follower struct {
		msgs jetstream.MessagesContext
		err  error
	}
	followed := make(chan follower, 1)
	go func() {
		cons, err := c.JetStream().OrderedConsumer(ctx, broker.ExecStream, jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{broker.ExecSubject(id, broker.ExecStdout), broker.ExecSubject(id, broker.ExecStderr), broker.ExecSubject(id, broker.ExecExit)},
			DeliverPolicy:  jetstream.DeliverAllPolicy,
		})
		if err != nil {
			followed <- follower{err: err}
			return
		}
		msgs, err := cons.Messages()
		followed <- follower{msgs, err}
	}()
	waited := false
	defer func() {
		if !waited { // Exec ended before it waited for the follower: stop that too
			if f := <-followed; f.msgs != nil {
				f.msgs.Stop()
			}
		}
	}()

	req, _ := json.Marshal(ExecRequest{Job: p.Job, Exec: id, Stage: stage, Script: script, Env: o.Env})
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	reply, err := c.Conn().RequestWithContext(rctx, ControlSubject(p.Host, "exec"), req)
	cancel()
	if err != nil {
		if errors.Is(err, nats.ErrNoResponders) {
			return sysErr("host %s does not answer (it died or left the pool)", p.Host)
		}
		return sysErr("%v", err)
	}
	var rep Reply
	if err := json.Unmarshal(reply.Data, &rep); err != nil {
		return sysErr("bad reply: %v", err)
	}
	if !rep.OK {
		return sysErr("%s", rep.Error)
	}
	if o.OnStarted != nil {
		o.OnStarted()
	}
	f := <-followed
	waited = true
	if f.err != nil {
		// The stage runs without a follower; with no keep-alives the host kills it within its lease.
		return sysErr("follow output: %v", f.err)
	}
	msgs := f.msgs
	defer msgs.Stop()

	type item struct {
		msg jetstream.Msg
		err error
	}
	items := make(chan item)
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			m, err := msgs.Next()
			select {
			case items <- item{m, err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	sigSubj := broker.ExecSubject(id, broker.ExecSignal)
	send := func(sig int) bool {
		b, _ := json.Marshal(Signal{Signal: sig})
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_, err := c.Conn().RequestWithContext(sctx, sigSubj, b)
		return err == nil
	}
	tick := time.NewTicker(o.KeepAlive)
	defer tick.Stop()
	lastAnswer := time.Now()
	alive := make(chan bool, 1)
	pinging := false
	for {
		select {
		case it := <-items:
			if it.err != nil {
				return sysErr("follow output: %v", it.err)
			}
			switch it.msg.Subject() {
			case broker.ExecSubject(id, broker.ExecStdout):
				stdout.Write(it.msg.Data())
			case broker.ExecSubject(id, broker.ExecStderr):
				stderr.Write(it.msg.Data())
			case broker.ExecSubject(id, broker.ExecExit):
				var ex Exit
				if err := json.Unmarshal(it.msg.Data(), &ex); err != nil {
					return sysErr("bad exit message: %v", err)
				}
				if ex.Error != "" {
					return ex, &Failure{System: true, Msg: fmt.Sprintf("stage %s of job %s on host %s: %s", stage, p.Job, p.Host, ex.Error)}
				}
				return ex, nil
			}
		case sig := <-o.Signals:
			send(int(sig))
		case <-tick.C:
			if !pinging {
				pinging = true
				go func() { alive <- send(0) }()
			}
			if time.Since(lastAnswer) > o.HostTimeout {
				return sysErr("host %s stopped answering for %v", p.Host, o.HostTimeout)
			}
		case ok := <-alive:
			pinging = false
			if ok {
				lastAnswer = time.Now()
			}
		case <-ctx.Done():
			return Exit{}, fmt.Errorf("jobs: stage %s of job %s: %w", stage, p.Job, ctx.Err())
		}
	}
}

// Cleanup asks the host that runs the job to tear it down and waits until it has. A host that is
// gone has nothing left to clean (its VMs died with it).
func Cleanup(ctx context.Context, c *broker.Client, p *Placement, failed bool, exitCode int) error {
	b, _ := json.Marshal(CleanupRequest{Job: p.Job, Failed: failed, ExitCode: exitCode})
	reply, err := c.Conn().RequestWithContext(ctx, ControlSubject(p.Host, "cleanup"), b)
	if errors.Is(err, nats.ErrNoResponders) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("jobs: cleanup %s on %s: %w", p.Job, p.Host, err)
	}
	var rep Reply
	if err := json.Unmarshal(reply.Data, &rep); err != nil {
		return fmt.Errorf("jobs: cleanup %s on %s: bad reply: %w", p.Job, p.Host, err)
	}
	if !rep.OK {
		return fmt.Errorf("jobs: cleanup %s on %s: %s", p.Job, p.Host, rep.Error)
	}
	return nil
}

// abandon takes back a job whose submitter gave up: the queued item is deleted if no host took it
// yet, and the host that did take it is told to drop it.
func abandon(c *broker.Client, id string, seq uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if st, err := c.JetStream().Stream(ctx, broker.WorkStream); err == nil {
		st.DeleteMsg(ctx, seq) // fails harmlessly when a host took it already
	}
	b, _ := json.Marshal(CleanupRequest{Job: id})
	c.Conn().Publish(CancelSubject, b)
	c.Conn().FlushWithContext(ctx)
	c.Publish(ctx, &broker.JobCanceled{Job: id, Reason: "abandoned by the runner (prepare ended before the VM was ready)"})
}
