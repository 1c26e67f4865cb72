package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/workers"
)

// session is how a client command reaches the workers: through the running daemon when there is
// one, else through a one-shot broker and workers embedded in this process for this command only
// (the embedded default: `virtkit run` works without `virtkit serve`).
type session struct {
	c       *broker.Client
	oneShot bool
	close   func()
}

// oneShotWorkers are the workers a one-shot session runs in-process.
var oneShotWorkers = map[string]bool{"launcher": true, "converter": true}

func (e *env) session(ctx context.Context) (*session, error) {
	c, _, err := e.connectBroker(ctx)
	if err == nil {
		return &session{c: c, close: c.Close}, nil
	}
	if !errors.Is(err, broker.ErrNoDaemon) {
		return nil, err
	}
	return e.oneShot(ctx)
}

// oneShot starts an embedded broker with its store in a private folder under the state dir, and
// the launcher and converter workers, all ending with the session.
func (e *env) oneShot(ctx context.Context) (s *session, err error) {
	cfg := e.cfg
	dir := filepath.Join(cfg.StateDir, "oneshot", fmt.Sprint(os.Getpid()))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var cleanups []func()
	cleanup := func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
		os.RemoveAll(dir)
	}
	defer func() {
		if err != nil {
			cleanup()
		}
	}()
	// The one-shot's broker and workers are plumbing of this one command: quiet unless debugging.
	log := e.log.With().Str("broker", "one-shot").Logger()
	log = log.Level(maxLevel(log))
	srv, err := broker.StartServer(ctx, broker.ServerConfig{StateDir: dir, Name: "virtkit-oneshot", Log: log})
	if err != nil {
		return nil, err
	}
	cleanups = append(cleanups, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		srv.Shutdown(sctx)
		cancel()
	})
	conn := srv.ClientConfig()
	conn.Host, conn.Name, conn.Log = broker.HostID(cfg.Host), "virtkit one-shot", log
	c, err := broker.Connect(ctx, conn)
	if err != nil {
		return nil, err
	}
	cleanups = append(cleanups, c.Close)
	if err := broker.Provision(ctx, c.JetStream(), broker.DefaultSchema(broker.SchemaOptions{Replicas: 1})); err != nil {
		return nil, err
	}
	sup := workers.New(workers.Config{Log: log})
	d := &daemon{Client: c, Slots: broker.NewSlots(cfg.VM.Capacity), Config: cfg, Log: log, Supervisor: sup}
	for i, f := range workerFactories {
		if !oneShotWorkers[workerNames[i]] {
			continue
		}
		w, err := f(ctx, d)
		if err != nil {
			return nil, err
		}
		if w != nil {
			sup.Add(w)
		}
	}
	wctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() { sup.Run(wctx); close(done) }()
	cleanups = append(cleanups, func() { stop(); <-done })
	return &session{c: c, oneShot: true, close: cleanup}, nil
}

// maxLevel keeps the embedded broker quiet unless debugging.
func maxLevel(l zerolog.Logger) zerolog.Level {
	if l.GetLevel() <= zerolog.DebugLevel {
		return l.GetLevel()
	}
	return zerolog.WarnLevel
}
