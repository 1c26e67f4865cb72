package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// The state tables. Each row is the fold of its aggregate's events in log order (Seq is the last
// one applied); times come from the events, so replaying the log gives identical rows.

// VM is a row of vk_vms.
type VM struct {
	ID         string    `json:"id"`
	Phase      string    `json:"phase"` // starting, ready, stopped, failed
	Host       string    `json:"host,omitempty"`
	Image      string    `json:"image,omitempty"`
	VMM        string    `json:"vmm,omitempty"`
	CPUs       int       `json:"cpus,omitempty"`
	MemoryMiB  int       `json:"memory_mib,omitempty"`
	Job        string    `json:"job,omitempty"`
	IP         string    `json:"ip,omitempty"`
	BootMillis int64     `json:"boot_ms,omitempty"`
	ExitCode   int       `json:"exit_code,omitempty"`
	Reason     string    `json:"reason,omitempty"`
	Error      string    `json:"error,omitempty"`
	Created    time.Time `json:"created"`
	Updated    time.Time `json:"updated"`
	Seq        uint64    `json:"seq"`
}

// Image is a row of vk_images.
type Image struct {
	ID        string    `json:"id"`
	Phase     string    `json:"phase"` // converting, ready, failed
	Ref       string    `json:"ref,omitempty"`
	Host      string    `json:"host,omitempty"`
	Digest    string    `json:"digest,omitempty"`
	Path      string    `json:"path,omitempty"`
	SizeBytes int64     `json:"size_bytes,omitempty"`
	FSUUID    string    `json:"fs_uuid,omitempty"`
	Error     string    `json:"error,omitempty"`
	Updated   time.Time `json:"updated"`
	Seq       uint64    `json:"seq"`
}

// Job is a row of vk_jobs.
type Job struct {
	ID       string    `json:"id"`
	Phase    string    `json:"phase"` // queued, running, succeeded, failed, canceled
	Image    string    `json:"image,omitempty"`
	Command  []string  `json:"command,omitempty"`
	Origin   string    `json:"origin,omitempty"`
	Host     string    `json:"host,omitempty"`
	VM       string    `json:"vm,omitempty"`
	ExitCode int       `json:"exit_code,omitempty"`
	Error    string    `json:"error,omitempty"`
	System   bool      `json:"system,omitempty"`
	Queued   time.Time `json:"queued,omitzero"`
	Started  time.Time `json:"started,omitzero"`
	Finished time.Time `json:"finished,omitzero"`
	Seq      uint64    `json:"seq"`
}

// Host is a row of vk_hosts.
type Host struct {
	ID       string         `json:"id"`
	Version  string         `json:"version,omitempty"`
	Started  time.Time      `json:"started"`
	LastSeen time.Time      `json:"last_seen"`
	Capacity int            `json:"capacity"`
	Running  int            `json:"running"`
	Workers  []WorkerStatus `json:"workers,omitempty"`
	TTL      Duration       `json:"ttl"`
	// Stopped is set by host.stopped: the host shut down cleanly.
	Stopped bool   `json:"stopped,omitempty"`
	Seq     uint64 `json:"seq"`
}

// State is the four tables in memory. The zero value is not usable; use NewState.
type State struct {
	VMs    map[string]*VM    `json:"vms"`
	Images map[string]*Image `json:"images"`
	Jobs   map[string]*Job   `json:"jobs"`
	Hosts  map[string]*Host  `json:"hosts"`
}

// NewState returns empty tables.
func NewState() *State {
	return &State{VMs: map[string]*VM{}, Images: map[string]*Image{}, Jobs: map[string]*Job{}, Hosts: map[string]*Host{}}
}

// Apply folds one event into the tables. Events at or below a row's Seq are already in it and are
// ignored, so applying a log twice, or overlapping replays, is harmless. It reports whether a row
// changed.
func (s *State) Apply(env *Envelope, ev Event) bool {
	id := env.Subject
	stale := func(seq uint64) bool { return env.Seq != 0 && env.Seq <= seq }
	switch e := ev.(type) {
	case *VMStarting, *VMReady, *VMStopped, *VMFailed:
		r := s.VMs[id]
		if r == nil {
			r = &VM{ID: id, Created: env.Time}
		} else if stale(r.Seq) {
			return false
		}
		switch e := e.(type) {
		case *VMStarting:
			*r = VM{ID: id, Phase: "starting", Host: e.Host, Image: e.Image, VMM: e.VMM, CPUs: e.CPUs, MemoryMiB: e.MemoryMiB, Job: e.Job, Created: env.Time}
		case *VMReady:
			r.Phase, r.IP, r.BootMillis = "ready", e.IP, e.BootMillis
		case *VMStopped:
			r.Phase, r.ExitCode, r.Reason = "stopped", e.ExitCode, e.Reason
		case *VMFailed:
			r.Phase, r.Error = "failed", e.Error
		}
		r.Updated, r.Seq = env.Time, env.Seq
		s.VMs[id] = r
	case *ImageConverting, *ImageConverted, *ImageFailed:
		r := s.Images[id]
		if r == nil {
			r = &Image{ID: id}
		} else if stale(r.Seq) {
			return false
		}
		switch e := e.(type) {
		case *ImageConverting:
			*r = Image{ID: id, Phase: "converting", Ref: e.Ref, Host: e.Host}
		case *ImageConverted:
			r.Phase, r.Ref, r.Digest, r.Path, r.SizeBytes, r.FSUUID, r.Error = "ready", e.Ref, e.Digest, e.Path, e.SizeBytes, e.FSUUID, ""
		case *ImageFailed:
			r.Phase, r.Error = "failed", e.Error
			if e.Ref != "" {
				r.Ref = e.Ref
			}
		}
		r.Updated, r.Seq = env.Time, env.Seq
		s.Images[id] = r
	case *JobQueued, *JobStarted, *JobSucceeded, *JobFailed, *JobCanceled:
		r := s.Jobs[id]
		if r == nil {
			r = &Job{ID: id}
		} else if stale(r.Seq) {
			return false
		}
		switch e := e.(type) {
		case *JobQueued:
			*r = Job{ID: id, Phase: "queued", Image: e.Image, Command: e.Command, Origin: e.Origin, Queued: env.Time}
		case *JobStarted:
			r.Phase, r.Host, r.VM, r.Started = "running", e.Host, e.VM, env.Time
		case *JobSucceeded:
			r.Phase, r.ExitCode, r.Finished = "succeeded", 0, env.Time
		case *JobFailed:
			r.Phase, r.ExitCode, r.Error, r.System, r.Finished = "failed", e.ExitCode, e.Error, e.System, env.Time
		case *JobCanceled:
			r.Phase, r.Error, r.Finished = "canceled", e.Reason, env.Time
		}
		r.Seq = env.Seq
		s.Jobs[id] = r
	case *HostHeartbeat:
		if r := s.Hosts[id]; r != nil && stale(r.Seq) {
			return false
		}
		s.Hosts[id] = &Host{ID: id, Version: e.Version, Started: e.Started, LastSeen: env.Time, Capacity: e.Capacity,
			Running: e.Running, Workers: e.Workers, TTL: e.TTL, Seq: env.Seq}
	case *HostStopped:
		// A tombstone, not a delete: an older heartbeat applied late must not bring the host back.
		// vk_hosts forgets the row after its TTL.
		r := s.Hosts[id]
		if r == nil {
			r = &Host{ID: id}
		} else if stale(r.Seq) {
			return false
		}
		r.Stopped, r.Running, r.LastSeen, r.Seq = true, 0, env.Time, env.Seq
		s.Hosts[id] = r
	default:
		return false
	}
	return true
}

// bucketOf maps an aggregate to its KV bucket.
func bucketOf(aggregate string) string {
	switch aggregate {
	case "vm":
		return BucketVMs
	case "image":
		return BucketImages
	case "job":
		return BucketJobs
	case "host":
		return BucketHosts
	}
	return ""
}

// row returns the JSON of one row, or nil if absent.
func (s *State) row(bucket, id string) ([]byte, error) {
	var v any
	switch bucket {
	case BucketVMs:
		if r, ok := s.VMs[id]; ok {
			v = r
		}
	case BucketImages:
		if r, ok := s.Images[id]; ok {
			v = r
		}
	case BucketJobs:
		if r, ok := s.Jobs[id]; ok {
			v = r
		}
	case BucketHosts:
		if r, ok := s.Hosts[id]; ok {
			v = r
		}
	}
	if v == nil {
		return nil, nil
	}
	return json.Marshal(v)
}

// load puts one row (JSON from KV) into the tables.
func (s *State) load(bucket, id string, data []byte) error {
	var err error
	switch bucket {
	case BucketVMs:
		r := &VM{}
		if err = json.Unmarshal(data, r); err == nil {
			s.VMs[id] = r
		}
	case BucketImages:
		r := &Image{}
		if err = json.Unmarshal(data, r); err == nil {
			s.Images[id] = r
		}
	case BucketJobs:
		r := &Job{}
		if err = json.Unmarshal(data, r); err == nil {
			s.Jobs[id] = r
		}
	case BucketHosts:
		r := &Host{}
		if err = json.Unmarshal(data, r); err == nil {
			s.Hosts[id] = r
		}
	default:
		return fmt.Errorf("broker: unknown bucket %q", bucket)
	}
	if err != nil {
		return fmt.Errorf("broker: row %s/%s: %w", bucket, id, err)
	}
	return nil
}

// Replay folds VIRTKIT_EVENTS from the first event up to the last one present when it starts.
func Replay(ctx context.Context, c *Client) (*State, error) {
	s := NewState()
	str, err := c.js.Stream(ctx, EventsStream)
	if err != nil {
		return nil, fmt.Errorf("broker: replay: %w", err)
	}
	last := str.CachedInfo().State.LastSeq
	if str.CachedInfo().State.Msgs == 0 {
		return s, nil
	}
	cons, err := c.js.OrderedConsumer(ctx, EventsStream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, fmt.Errorf("broker: replay: %w", err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(1024))
	if err != nil {
		return nil, fmt.Errorf("broker: replay: %w", err)
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	for {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("broker: replay: %w", ctx.Err())
			}
			return nil, fmt.Errorf("broker: replay: %w", err)
		}
		md, err := msg.Metadata()
		if err != nil {
			return nil, fmt.Errorf("broker: replay: %w", err)
		}
		if env, ev, err := decodeMsg(msg); err == nil {
			s.Apply(env, ev)
		} else {
			c.log.Warn().Err(err).Uint64("seq", md.Sequence.Stream).Msg("broker: replay: skip event")
		}
		if md.Sequence.Stream >= last || md.NumPending == 0 {
			return s, nil
		}
	}
}

// ReadProjection reads the four KV tables.
func ReadProjection(ctx context.Context, c *Client) (*State, error) {
	s := NewState()
	for _, b := range []string{BucketVMs, BucketImages, BucketJobs, BucketHosts} {
		kv, err := c.js.KeyValue(ctx, b)
		if err != nil {
			return nil, fmt.Errorf("broker: read %s: %w", b, err)
		}
		w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
		if err != nil {
			return nil, fmt.Errorf("broker: read %s: %w", b, err)
		}
		err = func() error {
			defer w.Stop()
			for {
				select {
				case e, ok := <-w.Updates():
					if !ok {
						return errors.New("watcher closed")
					}
					if e == nil {
						return nil
					}
					if err := s.load(b, e.Key(), e.Value()); err != nil {
						return err
					}
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		}()
		if err != nil {
			return nil, fmt.Errorf("broker: read %s: %w", b, err)
		}
	}
	return s, nil
}

// RebuildProjection replaces the KV tables with a replay of the log. Rows are written with their
// Seq, so a projector running at the same time only skips what is already there.
func RebuildProjection(ctx context.Context, c *Client) (*State, error) {
	s, err := Replay(ctx, c)
	if err != nil {
		return nil, err
	}
	for _, b := range []string{BucketVMs, BucketImages, BucketJobs, BucketHosts} {
		str, err := c.js.Stream(ctx, "KV_"+b)
		if err != nil {
			return nil, fmt.Errorf("broker: rebuild %s: %w", b, err)
		}
		if err := str.Purge(ctx); err != nil {
			return nil, fmt.Errorf("broker: rebuild %s: purge: %w", b, err)
		}
		kv, err := c.js.KeyValue(ctx, b)
		if err != nil {
			return nil, fmt.Errorf("broker: rebuild %s: %w", b, err)
		}
		for _, id := range s.ids(b) {
			data, err := s.row(b, id)
			if err != nil {
				return nil, fmt.Errorf("broker: rebuild %s/%s: %w", b, id, err)
			}
			if _, err := kv.Put(ctx, id, data); err != nil {
				return nil, fmt.Errorf("broker: rebuild %s/%s: %w", b, id, err)
			}
		}
	}
	return s, nil
}

func (s *State) ids(bucket string) []string {
	var out []string
	switch bucket {
	case BucketVMs:
		for k := range s.VMs {
			out = append(out, k)
		}
	case BucketImages:
		for k := range s.Images {
			out = append(out, k)
		}
	case BucketJobs:
		for k := range s.Jobs {
			out = append(out, k)
		}
	case BucketHosts:
		for k := range s.Hosts {
			out = append(out, k)
		}
	}
	return out
}

// Projector keeps the KV tables up to date from VIRTKIT_EVENTS. Every host may run one: each
// follows the log in strict order through an ordered consumer, starting after its checkpoint
// (vk_checkpoints, key projector-<host>), and writes rows with compare-and-set, skipping events a
// row already contains. So several projectors agree, and a restarted or crashed one resumes at
// its checkpoint, re-applying harmlessly what it did after it. (A durable consumer is not used
// on purpose: after a crash it redelivers the unacked events after newer ones, out of order.)
// It is a workers.Worker.
type Projector struct {
	c     *Client
	log   zerolog.Logger
	cache map[string]cached
}

type cached struct {
	state *State
	rev   uint64
}

// NewProjector returns the projector of this client's host.
func NewProjector(c *Client, log zerolog.Logger) *Projector {
	return &Projector{c: c, log: log.With().Str("worker", "projector").Logger(), cache: map[string]cached{}}
}

// Name is the worker name.
func (p *Projector) Name() string { return "projector" }

// ProjectorCheckpoint is the vk_checkpoints key of host's projector.
func ProjectorCheckpoint(host string) string { return "projector-" + host }

func readCheckpoint(ctx context.Context, kv jetstream.KeyValue, key string) (uint64, error) {
	e, err := kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(string(e.Value()), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("checkpoint %s: %w", key, err)
	}
	return n, nil
}

// ProjectionLag is how many events of the log host's projector has not applied yet.
func ProjectionLag(ctx context.Context, c *Client, host string) (uint64, error) {
	kv, err := c.js.KeyValue(ctx, BucketCheckpoints)
	if err != nil {
		return 0, fmt.Errorf("broker: projection lag: %w", err)
	}
	done, err := readCheckpoint(ctx, kv, ProjectorCheckpoint(host))
	if err != nil {
		return 0, fmt.Errorf("broker: projection lag: %w", err)
	}
	st, err := c.js.Stream(ctx, EventsStream)
	if err != nil {
		return 0, fmt.Errorf("broker: projection lag: %w", err)
	}
	last := st.CachedInfo().State.LastSeq
	if done >= last {
		return 0, nil
	}
	return last - done, nil
}

// Run applies events until ctx ends, then catches up with the log as it is at that moment (for at
// most a few seconds), writes its checkpoint and returns.
func (p *Projector) Run(ctx context.Context) error {
	ckv, err := p.c.js.KeyValue(ctx, BucketCheckpoints)
	if err != nil {
		return fmt.Errorf("broker: projector: %w", err)
	}
	key := ProjectorCheckpoint(p.c.host)
	done, err := readCheckpoint(ctx, ckv, key)
	if err != nil {
		return fmt.Errorf("broker: projector: %w", err)
	}
	if st, err := p.c.js.Stream(ctx, EventsStream); err == nil && done > st.CachedInfo().State.LastSeq {
		// The log is shorter than what we applied: it was recreated. Follow the new one from
		// its start (rows written from the old log keep their sequences; rebuild them with
		// RebuildProjection).
		p.log.Warn().Uint64("checkpoint", done).Uint64("last", st.CachedInfo().State.LastSeq).Msg("event log is behind the checkpoint; following it from the start")
		done = 0
	}
	cons, err := p.c.js.OrderedConsumer(ctx, EventsStream, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:   done + 1,
	})
	if err != nil {
		return fmt.Errorf("broker: projector: %w", err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(512))
	if err != nil {
		return fmt.Errorf("broker: projector: %w", err)
	}
	defer it.Stop()
	// On stop, catch up with the log as it is at that moment (the last events of workers that
	// stopped before us, host.stopped), for at most catchUp, then end.
	var applied, target atomic.Uint64
	applied.Store(done)
	const catchUp = 5 * time.Second
	stopped := make(chan struct{})
	defer close(stopped)
	go func() {
		select {
		case <-ctx.Done():
		case <-stopped:
			return
		}
		last := uint64(1<<64 - 1)
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		if st, err := p.c.js.Stream(sctx, EventsStream); err == nil {
			last = st.CachedInfo().State.LastSeq
		}
		cancel()
		target.Store(max(last, 1))
		if applied.Load() >= last {
			it.Stop()
			return
		}
		select {
		case <-time.After(catchUp):
			it.Stop()
		case <-stopped:
		}
	}()
	wctx := context.WithoutCancel(ctx)
	saved, lastSave := done, time.Now()
	save := func() error {
		if done == saved {
			return nil
		}
		if _, err := ckv.Put(wctx, key, []byte(strconv.FormatUint(done, 10))); err != nil {
			return fmt.Errorf("broker: projector: checkpoint: %w", err)
		}
		saved, lastSave = done, time.Now()
		return nil
	}
	p.log.Debug().Uint64("from", done+1).Msg("projecting events")
	batch := newWriteBatch()
	flush := func() error {
		if err := p.flush(wctx, batch); err != nil {
			return err
		}
		return save()
	}
	for {
		msg, err := it.Next()
		if err != nil {
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return flush()
			}
			return fmt.Errorf("broker: projector: %w", err)
		}
		md, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("broker: projector: %w", err)
		}
		env, ev, err := decodeMsg(msg)
		if err != nil {
			p.log.Warn().Err(err).Str("subject", msg.Subject()).Msg("skip event")
		} else if err := p.stage(wctx, batch, env, ev); err != nil {
			it.Stop()
			return fmt.Errorf("broker: projector: event %d (%s %s): %w", env.Seq, env.Type, env.Subject, err)
		}
		done = md.Sequence.Stream
		applied.Store(done)
		// Write when caught up, or every so often while catching up on a long log.
		if md.NumPending == 0 || len(batch.rows) >= 512 || done-saved >= 4096 || time.Since(lastSave) > time.Second {
			if err := flush(); err != nil {
				it.Stop()
				return err
			}
		}
		if t := target.Load(); t != 0 && done >= t {
			it.Stop()
			return flush()
		}
	}
}

// writeBatch is the rows changed since the last flush, with the events that changed them (to
// fold them again if a write loses a compare-and-set race).
type writeBatch struct {
	rows  map[string]*dirtyRow
	order []string
}

type dirtyRow struct {
	bucket, id string
	events     []stagedEvent
}

type stagedEvent struct {
	env *Envelope
	ev  Event
}

func newWriteBatch() *writeBatch { return &writeBatch{rows: map[string]*dirtyRow{}} }

// stage folds one event into the cached row; the write happens at the next flush, so several
// events for one row in a batch cost one write.
func (p *Projector) stage(ctx context.Context, b *writeBatch, env *Envelope, ev Event) error {
	bucket := bucketOf(env.Aggregate())
	if bucket == "" {
		return nil
	}
	key := bucket + "/" + env.Subject
	cur, ok := p.cache[key]
	if !ok {
		var err error
		if cur, err = p.load(ctx, bucket, env.Subject); err != nil {
			return err
		}
		p.cache[key] = cur
	}
	if !cur.state.Apply(env, ev) {
		return nil
	}
	d := b.rows[key]
	if d == nil {
		d = &dirtyRow{bucket: bucket, id: env.Subject}
		b.rows[key] = d
		b.order = append(b.order, key)
	}
	d.events = append(d.events, stagedEvent{env, ev})
	return nil
}

func (p *Projector) load(ctx context.Context, bucket, id string) (cached, error) {
	cur := cached{state: NewState()}
	kv, err := p.c.js.KeyValue(ctx, bucket)
	if err != nil {
		return cur, err
	}
	e, err := kv.Get(ctx, id)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return cur, nil
	case err != nil:
		return cur, err
	}
	if err := cur.state.load(bucket, id, e.Value()); err != nil {
		return cur, err
	}
	cur.rev = e.Revision()
	return cur, nil
}

// flush writes the batch's rows with pipelined compare-and-set publishes (expected last
// sequence of the key's subject = the revision the row was read at). A row that lost a race
// with another host's projector is read again and its events folded again, one write at a time.
func (p *Projector) flush(ctx context.Context, b *writeBatch) error {
	if len(b.order) == 0 {
		return nil
	}
	type inflight struct {
		key string
		fut jetstream.PubAckFuture
	}
	futs := make([]inflight, 0, len(b.order))
	for _, key := range b.order {
		d := b.rows[key]
		cur := p.cache[key]
		data, err := cur.state.row(d.bucket, d.id)
		if err != nil {
			return err
		}
		msg := nats.NewMsg("$KV." + d.bucket + "." + d.id)
		msg.Data = data
		fut, err := p.c.js.PublishMsgAsync(msg, jetstream.WithExpectLastSequencePerSubject(cur.rev))
		if err != nil {
			return err
		}
		futs = append(futs, inflight{key, fut})
	}
	var retry []string
	for _, f := range futs {
		select {
		case ack := <-f.fut.Ok():
			c := p.cache[f.key]
			c.rev = ack.Sequence
			p.cache[f.key] = c
		case err := <-f.fut.Err():
			var apiErr *jetstream.APIError
			if !errors.As(err, &apiErr) || (apiErr.ErrorCode != jetstream.JSErrCodeStreamWrongLastSequence &&
				apiErr.ErrorCode != jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
				return fmt.Errorf("write %s: %w", f.key, err)
			}
			retry = append(retry, f.key)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for _, key := range retry {
		delete(p.cache, key)
		for _, se := range b.rows[key].events {
			if err := p.apply(ctx, se.env, se.ev); err != nil {
				return fmt.Errorf("write %s: %w", key, err)
			}
		}
	}
	if len(p.cache) > 50000 {
		clear(p.cache)
	}
	clear(b.rows)
	b.order = b.order[:0]
	return nil
}

// apply writes one event into its row with compare-and-set, retrying on conflicts.
func (p *Projector) apply(ctx context.Context, env *Envelope, ev Event) error {
	bucket := bucketOf(env.Aggregate())
	if bucket == "" {
		return nil
	}
	kv, err := p.c.js.KeyValue(ctx, bucket)
	if err != nil {
		return err
	}
	key := bucket + "/" + env.Subject
	for attempt := 0; ; attempt++ {
		cur, ok := p.cache[key]
		if !ok {
			if cur, err = p.load(ctx, bucket, env.Subject); err != nil {
				return err
			}
		}
		if !cur.state.Apply(env, ev) {
			p.cache[key] = cur
			return nil
		}
		data, err := cur.state.row(bucket, env.Subject)
		if err != nil {
			return err
		}
		var rev uint64
		if cur.rev == 0 {
			rev, err = kv.Create(ctx, env.Subject, data)
		} else {
			rev, err = kv.Update(ctx, env.Subject, data, cur.rev)
		}
		if err == nil {
			p.cache[key] = cached{state: cur.state, rev: rev}
			return nil
		}
		delete(p.cache, key)
		conflict := errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch)
		if !conflict || attempt >= 10 {
			return err
		}
		// Someone else wrote the row (another host's projector): read it again.
	}
}
