package workers

import (
	"context"
	"fmt"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/broker"
)

// HeartbeatConfig configures a Heartbeat.
type HeartbeatConfig struct {
	// Supervisor whose workers the heartbeat reports; may be nil.
	Supervisor *Supervisor
	// Slots is the host's capacity; may be nil (capacity 0).
	Slots *broker.Slots
	// Version of virtkit on this host.
	Version string
	// Interval between heartbeats; default 5s. TTL is how long the host counts as alive without
	// one; default 30s (the vk_hosts bucket TTL), at least 3 intervals.
	Interval, TTL time.Duration
	Log           zerolog.Logger
}

// Heartbeat publishes host.heartbeat events (with a message TTL) so vk_hosts lists this host,
// its capacity and its workers; on a clean stop it publishes host.stopped.
type Heartbeat struct {
	c       *broker.Client
	cfg     HeartbeatConfig
	started time.Time
}

// NewHeartbeat returns the heartbeat worker of c's host.
func NewHeartbeat(c *broker.Client, cfg HeartbeatConfig) *Heartbeat {
	if cfg.Interval == 0 {
		cfg.Interval = 5 * time.Second
	}
	if cfg.TTL == 0 {
		cfg.TTL = 30 * time.Second
	}
	cfg.TTL = max(cfg.TTL, 3*cfg.Interval)
	return &Heartbeat{c: c, cfg: cfg, started: time.Now().UTC()}
}

// Name is the worker name.
func (h *Heartbeat) Name() string { return "heartbeat" }

func (h *Heartbeat) beat(ctx context.Context) error {
	ev := &broker.HostHeartbeat{Host: h.c.Host(), Version: h.cfg.Version, Started: h.started, TTL: broker.Duration(h.cfg.TTL)}
	if h.cfg.Slots != nil {
		ev.Capacity, ev.Running = h.cfg.Slots.Capacity(), h.cfg.Slots.InUse()
	}
	if h.cfg.Supervisor != nil {
		ev.Workers = h.cfg.Supervisor.Status()
	}
	_, err := h.c.Publish(ctx, ev, broker.WithTTL(h.cfg.TTL))
	return err
}

// Run beats until ctx ends, then says goodbye. A failed beat is logged, not fatal: the broker may
// be reconnecting. Run fails only when beats keep failing for a whole TTL.
func (h *Heartbeat) Run(ctx context.Context) error {
	t := time.NewTicker(h.cfg.Interval)
	defer t.Stop()
	lastOK := time.Now()
	for {
		bctx, cancel := context.WithTimeout(ctx, h.cfg.Interval)
		err := h.beat(bctx)
		cancel()
		switch {
		case err == nil:
			lastOK = time.Now()
		case ctx.Err() == nil:
			h.cfg.Log.Warn().Err(err).Msg("heartbeat")
			if time.Since(lastOK) > h.cfg.TTL {
				return fmt.Errorf("workers: heartbeat: none delivered for %v: %w", h.cfg.TTL, err)
			}
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			if _, err := h.c.Publish(sctx, &broker.HostStopped{Host: h.c.Host(), Reason: "shutdown"}); err != nil {
				h.cfg.Log.Warn().Err(err).Msg("heartbeat: announce stop")
			}
			return nil
		}
	}
}
