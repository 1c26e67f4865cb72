package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/rs/zerolog"
)

// ServerConfig configures the embedded NATS server. The zero value (plus StateDir) is usable.
type ServerConfig struct {
	// StateDir holds the JetStream store (StateDir/broker/jetstream), the generated credential
	// (StateDir/broker/local.nk, 0600) and a lock that keeps a second server off the store.
	StateDir string
	// Port on 127.0.0.1; 0 picks a free port.
	Port int
	// Name of the server; default "virtkit-" + host name.
	Name string
	// SyncAlways fsyncs every write. Without it an acknowledged message survives a crash of the
	// process (it is in the kernel's page cache) but not necessarily a power cut.
	SyncAlways bool
	// Log receives the server's log; the zero logger discards it.
	Log zerolog.Logger
}

// Server is a running embedded nats-server with JetStream, listening on loopback only.
type Server struct {
	ns   *server.Server
	cfg  ServerConfig
	seed string
	lock *os.File
}

// StartServer starts the embedded server and waits until it accepts connections. The credential
// is generated once and kept, so clients that read it stay valid across restarts.
func StartServer(ctx context.Context, cfg ServerConfig) (*Server, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("broker: start server: empty state dir")
	}
	dir := filepath.Join(cfg.StateDir, "broker")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("broker: start server: %w", err)
	}
	lock, err := lockFile(filepath.Join(dir, "server.lock"))
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Server, error) { lock.Close(); return nil, err }
	seedFile := filepath.Join(dir, "local.nk")
	pub, err := ensureSeed(seedFile)
	if err != nil {
		return fail(err)
	}
	if cfg.Name == "" {
		h, _ := os.Hostname()
		cfg.Name = "virtkit-" + h
	}
	port := cfg.Port
	if port == 0 {
		port = server.RANDOM_PORT
	}
	opts := &server.Options{
		ServerName:             cfg.Name,
		Host:                   "127.0.0.1",
		Port:                   port,
		NoSigs:                 true,
		JetStream:              true,
		StoreDir:               dir, // the server adds "jetstream"
		SyncAlways:             cfg.SyncAlways,
		Nkeys:                  []*server.NkeyUser{{Nkey: pub}},
		DisableJetStreamBanner: true,
		MaxPayload:             8 << 20,
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return fail(fmt.Errorf("broker: start server: %w", err))
	}
	ns.SetLoggerV2(zlogAdapter{cfg.Log}, cfg.Log.GetLevel() <= zerolog.DebugLevel, cfg.Log.GetLevel() <= zerolog.TraceLevel, false)
	go ns.Start()
	wait := 30 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		wait = time.Until(dl)
	}
	if !ns.ReadyForConnections(wait) {
		ns.Shutdown()
		ns.WaitForShutdown()
		return fail(fmt.Errorf("broker: start server: not ready after %v (port %d in use, or store %s unreadable? see the log)", wait, cfg.Port, opts.StoreDir))
	}
	if !ns.JetStreamEnabled() {
		ns.Shutdown()
		ns.WaitForShutdown()
		return fail(errors.New("broker: start server: JetStream did not start (see the log)"))
	}
	return &Server{ns: ns, cfg: cfg, seed: seedFile, lock: lock}, nil
}

// URL is the client URL, nats://127.0.0.1:<port>.
func (s *Server) URL() string {
	addr, _ := s.ns.Addr().(*net.TCPAddr)
	if addr == nil {
		return s.ns.ClientURL()
	}
	return "nats://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(addr.Port))
}

// ClientConfig is how to connect to this server (URL and credential).
func (s *Server) ClientConfig() Config {
	return Config{URL: s.URL(), NKeySeed: s.seed}
}

// StoreDir is the JetStream store folder.
func (s *Server) StoreDir() string { return filepath.Join(s.cfg.StateDir, "broker", "jetstream") }

// Shutdown stops the server gracefully: client connections are closed and JetStream flushes and
// closes every stream. It returns when the server is down or ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		s.ns.Shutdown()
		s.ns.WaitForShutdown()
		close(done)
	}()
	defer s.lock.Close()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("broker: server shutdown: %w", ctx.Err())
	}
}

// lockFile takes an exclusive, non-blocking flock so two servers never share a store.
func lockFile(p string) (*os.File, error) {
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("broker: lock %s: %w", p, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("broker: %s: another virtkit server uses this state dir", p)
		}
		return nil, fmt.Errorf("broker: lock %s: %w", p, err)
	}
	return f, nil
}

// ensureSeed reads the nkey user seed in p, creating it (0600) when absent, and returns the
// public key.
func ensureSeed(p string) (string, error) {
	data, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		kp, err := nkeys.CreateUser()
		if err != nil {
			return "", fmt.Errorf("broker: generate credential: %w", err)
		}
		seed, err := kp.Seed()
		if err != nil {
			return "", fmt.Errorf("broker: generate credential: %w", err)
		}
		tmp := p + ".tmp"
		if err := os.WriteFile(tmp, append(seed, '\n'), 0o600); err != nil {
			return "", fmt.Errorf("broker: write credential: %w", err)
		}
		if err := os.Rename(tmp, p); err != nil {
			return "", fmt.Errorf("broker: write credential: %w", err)
		}
		return kp.PublicKey()
	}
	if err != nil {
		return "", fmt.Errorf("broker: read credential: %w", err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		return "", fmt.Errorf("broker: read credential: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("broker: credential %s mode %v: %w", p, fi.Mode().Perm(), ErrInsecureCredential)
	}
	kp, err := nkeys.ParseDecoratedNKey(data)
	if err != nil {
		return "", fmt.Errorf("broker: credential %s: %w", p, err)
	}
	return kp.PublicKey()
}

// zlogAdapter routes nats-server's log to zerolog.
type zlogAdapter struct{ l zerolog.Logger }

func (z zlogAdapter) Noticef(f string, v ...any) { z.l.Debug().Str("component", "nats").Msgf(f, v...) }
func (z zlogAdapter) Warnf(f string, v ...any)   { z.l.Warn().Str("component", "nats").Msgf(f, v...) }
func (z zlogAdapter) Fatalf(f string, v ...any)  { z.l.Error().Str("component", "nats").Msgf(f, v...) }
func (z zlogAdapter) Errorf(f string, v ...any)  { z.l.Error().Str("component", "nats").Msgf(f, v...) }
func (z zlogAdapter) Debugf(f string, v ...any)  { z.l.Debug().Str("component", "nats").Msgf(f, v...) }
func (z zlogAdapter) Tracef(f string, v ...any)  { z.l.Trace().Str("component", "nats").Msgf(f, v...) }
