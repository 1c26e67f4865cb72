// Package converter is the worker that turns images into bootable bundles for the fleet: it takes
// Requests from the vk.work.image.convert work queue, runs imaging/oci.Convert, and publishes
// image.converting, then image.converted or image.failed events.
//
// Work is de-duplicated at three levels: Submit derives the work id from the request, so the same
// request submitted twice within JetStream's dedupe window is queued once; requests for the same
// bundle that are in flight on this host share one conversion; and hosts sharing a bundle store
// build a fingerprint once (imaging/store's flock). Events carry ids derived from the work id, so
// a redelivered item does not log its events twice.
//
// Concurrency: a Worker's Run owns every goroutine it starts and returns after draining (items in
// flight finish within the broker's grace, or are handed back for redelivery).
package converter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/imaging/rootfs"
	"github.com/virtkit/virtkit/imaging/store"
)

// Request is the body of a vk.work.image.convert item.
type Request struct {
	Ref       string `json:"ref"`
	Platform  string `json:"platform,omitempty"`
	Insecure  bool   `json:"insecure,omitempty"`
	Pull      string `json:"pull,omitempty"`
	Size      int64  `json:"size,omitempty"`
	Free      int64  `json:"free,omitempty"`
	NoJournal bool   `json:"no_journal,omitempty"`
}

// ImageID is the id of the image aggregate (the events' subject and the vk_images key) for a
// reference and platform ("" meaning the default, linux/amd64).
func ImageID(ref, platform string) string {
	if platform == "" {
		platform = oci.DefaultPlatform
	}
	h := sha256.Sum256([]byte(ref + "\n" + platform))
	return "img-" + hex.EncodeToString(h[:10])
}

// key identifies what a request builds (everything but the pull policy).
func (r Request) key() string {
	b, _ := json.Marshal(Request{Ref: r.Ref, Platform: r.Platform, Insecure: r.Insecure, Size: r.Size, Free: r.Free, NoJournal: r.NoJournal})
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:12])
}

// Submit queues a conversion and returns the image id its events will carry.
func Submit(ctx context.Context, c *broker.Client, r Request) (string, error) {
	if _, err := oci.ParseSource(r.Ref, r.Insecure); err != nil {
		return "", fmt.Errorf("converter: submit: %w", err)
	}
	b, _ := json.Marshal(r)
	h := sha256.Sum256(b)
	if _, err := c.Submit(ctx, broker.WorkImageConvert, "convert-"+hex.EncodeToString(h[:12]), r); err != nil {
		return "", fmt.Errorf("converter: submit: %w", err)
	}
	return ImageID(r.Ref, r.Platform), nil
}

// Config configures a Worker. Client and Convert.Store/Agent are required.
type Config struct {
	Client *broker.Client
	// Slots is the host's capacity for conversions; default 2.
	Slots *broker.Slots
	// Convert holds the host's settings (store, layer cache, agent, keychain); requests add the
	// reference, platform and ext4 options.
	Convert oci.ConvertOptions
	Log     zerolog.Logger
}

// Worker consumes conversion requests.
type Worker struct {
	cfg Config

	mu       sync.Mutex
	inflight map[string]*call
}

type call struct {
	done chan struct{}
	b    *store.Bundle
	err  error
}

// New checks cfg and returns a Worker.
func New(cfg Config) (*Worker, error) {
	if cfg.Client == nil {
		return nil, errors.New("converter: nil broker client")
	}
	if cfg.Convert.Store == "" || cfg.Convert.Agent == "" {
		return nil, errors.New("converter: the bundle store and the agent binary are required")
	}
	if cfg.Slots == nil {
		cfg.Slots = broker.NewSlots(2)
	}
	return &Worker{cfg: cfg, inflight: map[string]*call{}}, nil
}

// Name implements workers.Worker.
func (w *Worker) Name() string { return "converter" }

// Run consumes work until ctx ends, then drains.
func (w *Worker) Run(ctx context.Context) error {
	return w.cfg.Client.RunWork(ctx, broker.WorkOptions{Subject: broker.WorkImageConvert, Slots: w.cfg.Slots, Log: w.cfg.Log}, w.handle)
}

func (w *Worker) handle(ctx context.Context, wk *broker.Work) error {
	var r Request
	if err := wk.Decode(&r); err != nil {
		return err
	}
	if r.Ref == "" {
		return broker.Permanent(errors.New("converter: request without ref"))
	}
	id := ImageID(r.Ref, r.Platform)
	log := w.cfg.Log.With().Str("image", r.Ref).Str("id", id).Str("work", wk.ID).Logger()
	if err := w.publish(ctx, wk, "converting", &broker.ImageConverting{Image: id, Ref: r.Ref, Host: w.cfg.Client.Host()}); err != nil {
		return err
	}
	b, err := w.convert(ctx, r)
	if err != nil {
		if ctx.Err() != nil {
			return err // handed back for redelivery; no verdict yet
		}
		perm := permanent(err)
		log.Warn().Err(err).Bool("permanent", perm).Int("attempt", wk.Attempt).Msg("conversion failed")
		if perm {
			if perr := w.publish(ctx, wk, "failed", &broker.ImageFailed{Image: id, Ref: r.Ref, Error: err.Error()}); perr != nil {
				return perr
			}
			return broker.Permanent(err)
		}
		return err
	}
	log.Info().Str("bundle", b.Fingerprint).Msg("image converted")
	return w.publish(ctx, wk, "converted", &broker.ImageConverted{Image: id, Ref: r.Ref, Digest: b.Image.ManifestDigest,
		Path: b.Dir, SizeBytes: b.Size, FSUUID: b.FSUUID})
}

// convert runs one conversion per request key at a time on this host; later requests for the
// same key wait for it and share its result.
func (w *Worker) convert(ctx context.Context, r Request) (*store.Bundle, error) {
	k := r.key()
	w.mu.Lock()
	if c, ok := w.inflight[k]; ok {
		w.mu.Unlock()
		select {
		case <-c.done:
			if c.err == nil {
				return c.b, nil
			}
			// The first one failed (perhaps canceled): try on our own.
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		w.mu.Lock()
	}
	c := &call{done: make(chan struct{})}
	w.inflight[k] = c
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		delete(w.inflight, k)
		w.mu.Unlock()
		close(c.done)
	}()
	o := w.cfg.Convert
	o.Platform, o.Insecure, o.Pull = r.Platform, r.Insecure, r.Pull
	o.Size, o.Free, o.NoJournal = r.Size, r.Free, r.NoJournal
	o.Log = w.cfg.Log
	c.b, c.err = oci.Convert(ctx, r.Ref, o)
	return c.b, c.err
}

// permanent says whether retrying cannot help: the request or the image itself is bad.
func permanent(err error) bool {
	return errors.Is(err, oci.ErrNotPresent) || errors.Is(err, rootfs.ErrLimit) ||
		errors.Is(err, rootfs.ErrInvalid) || errors.Is(err, oci.ErrInvalid)
}

// publish stores an event whose id derives from the work item, so redeliveries store it once.
func (w *Worker) publish(ctx context.Context, wk *broker.Work, kind string, ev broker.Event) error {
	env, err := broker.NewEnvelope(w.cfg.Client.Host(), ev)
	if err != nil {
		return broker.Permanent(fmt.Errorf("converter: %w", err))
	}
	h := sha256.Sum256([]byte(wk.ID + "\n" + kind + "\n" + fmt.Sprint(wk.Attempt)))
	if kind != "converting" {
		h = sha256.Sum256([]byte(wk.ID + "\n" + kind))
	}
	env.ID = "cv-" + hex.EncodeToString(h[:12])
	if _, err := w.cfg.Client.PublishEnvelope(ctx, env); err != nil {
		return fmt.Errorf("converter: publish %s: %w", ev.EventType(), err)
	}
	return nil
}
