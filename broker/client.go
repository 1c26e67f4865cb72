package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// Config says how to reach a NATS server. Only URL is required.
type Config struct {
	// URL of the server or a comma-separated list of cluster members (nats://host:4222, tls://…).
	URL string `json:"url"`
	// Creds is a NATS credentials file (user JWT + nkey seed) for an operator-managed cluster, or
	// a file holding just an nkey user seed.
	Creds string `json:"creds,omitempty"`
	// NKeySeed is a file holding a bare nkey user seed: the credential of the embedded server.
	NKeySeed string `json:"nkey_seed,omitempty"`
	// TLS files; TLSCert and TLSKey go together.
	TLSCA   string `json:"tls_ca,omitempty"`
	TLSCert string `json:"tls_cert,omitempty"`
	TLSKey  string `json:"tls_key,omitempty"`

	// Name is the connection name the server shows. Default "virtkit".
	Name string `json:"-"`
	// Host is this machine's name: the Source of the events it publishes, a valid subject token
	// (see HostID). Default HostID(os.Hostname()).
	Host string `json:"-"`
	// Log receives connection state changes. The zero logger discards.
	Log zerolog.Logger `json:"-"`
}

// Validate checks the config without dialling: a URL with a NATS scheme and readable credential
// files. Errors name the field and the problem.
func (c Config) Validate() error {
	if c.URL == "" {
		return errors.New("broker: config: empty NATS URL")
	}
	for _, one := range splitURLs(c.URL) {
		u, err := url.Parse(one)
		if err != nil || u.Host == "" {
			return fmt.Errorf("broker: config: NATS URL %q is not like nats://host:4222", one)
		}
		switch u.Scheme {
		case "nats", "tls", "ws", "wss":
		default:
			return fmt.Errorf("broker: config: NATS URL %q: scheme %q, want nats, tls, ws or wss", one, u.Scheme)
		}
	}
	if c.Creds != "" && c.NKeySeed != "" {
		return errors.New("broker: config: both a creds file and an nkey seed given; use one")
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return errors.New("broker: config: tls_cert and tls_key go together")
	}
	for _, f := range []struct{ name, path string }{{"creds", c.Creds}, {"nkey seed", c.NKeySeed}, {"tls_ca", c.TLSCA}, {"tls_cert", c.TLSCert}, {"tls_key", c.TLSKey}} {
		if f.path == "" {
			continue
		}
		fh, err := os.Open(f.path)
		if err != nil {
			return fmt.Errorf("broker: config: %s file: %w", f.name, err)
		}
		fh.Close()
	}
	return nil
}

func splitURLs(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ',' {
			if part := trimSpace(s[start:i]); part != "" {
				out = append(out, part)
			}
			start = i + 1
		}
	}
	return out
}

func trimSpace(s string) string {
	for len(s) > 0 && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}

// Client is a connection to the broker with its JetStream context. It is safe for concurrent use.
type Client struct {
	nc   *nats.Conn
	js   jetstream.JetStream
	host string
	log  zerolog.Logger
}

// Connect dials the server described by cfg. It fails fast (no retry loop) when the server is not
// there; once connected it reconnects forever, buffering publishes.
func Connect(ctx context.Context, cfg Config) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Name == "" {
		cfg.Name = "virtkit"
	}
	if cfg.Host == "" {
		h, _ := os.Hostname()
		cfg.Host = HostID(h)
	}
	if err := validToken(cfg.Host); err != nil {
		return nil, fmt.Errorf("broker: connect: host name: %w", err)
	}
	timeout := 5 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			return nil, fmt.Errorf("broker: connect %s: %w", cfg.URL, context.DeadlineExceeded)
		}
	}
	log := cfg.Log
	opts := []nats.Option{
		nats.Name(cfg.Name),
		nats.Timeout(timeout),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn().Err(err).Msg("broker: disconnected")
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info().Str("url", nc.ConnectedUrlRedacted()).Msg("broker: reconnected") }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			ev := log.Warn().Err(err)
			if sub != nil {
				ev = ev.Str("subject", sub.Subject)
			}
			ev.Msg("broker: async error")
		}),
	}
	if cfg.Creds != "" {
		// A creds file holds a user JWT and its seed; a file with only an nkey seed (like the
		// embedded server's credential) is accepted too.
		data, err := os.ReadFile(cfg.Creds)
		if err != nil {
			return nil, fmt.Errorf("broker: connect: creds file: %w", err)
		}
		if bytes.Contains(data, []byte("BEGIN NATS USER JWT")) {
			opts = append(opts, nats.UserCredentials(cfg.Creds))
		} else {
			cfg.NKeySeed = cfg.Creds
		}
		clear(data)
	}
	if cfg.NKeySeed != "" {
		o, err := nats.NkeyOptionFromSeed(cfg.NKeySeed)
		if err != nil {
			return nil, fmt.Errorf("broker: connect: nkey seed %s: %w", cfg.NKeySeed, err)
		}
		opts = append(opts, o)
	}
	if cfg.TLSCA != "" {
		opts = append(opts, nats.RootCAs(cfg.TLSCA))
	}
	if cfg.TLSCert != "" {
		opts = append(opts, nats.ClientCert(cfg.TLSCert, cfg.TLSKey))
	}
	type result struct {
		nc  *nats.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		nc, err := nats.Connect(cfg.URL, opts...)
		done <- result{nc, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		go func() {
			if r := <-done; r.nc != nil {
				r.nc.Close()
			}
		}()
		return nil, fmt.Errorf("broker: connect %s: %w", cfg.URL, ctx.Err())
	}
	if r.err != nil {
		return nil, fmt.Errorf("broker: connect %s: %w", cfg.URL, r.err)
	}
	js, err := jetstream.New(r.nc)
	if err != nil {
		r.nc.Close()
		return nil, fmt.Errorf("broker: jetstream on %s: %w", cfg.URL, err)
	}
	return &Client{nc: r.nc, js: js, host: cfg.Host, log: log}, nil
}

// Option adjusts the Config that ConnectLocal builds from the endpoint file.
type Option func(*Config)

// WithLogger sets the logger of the connection.
func WithLogger(l zerolog.Logger) Option { return func(c *Config) { c.Log = l } }

// WithHost sets the host name used as the Source of published events.
func WithHost(h string) Option { return func(c *Config) { c.Host = h } }

// WithName sets the connection name.
func WithName(n string) Option { return func(c *Config) { c.Name = n } }

// ConnectLocal connects to the daemon whose endpoint file is in stateDir (written by `virtkit
// serve`). It returns an error wrapping ErrNoDaemon when there is none.
func ConnectLocal(ctx context.Context, stateDir string, opts ...Option) (*Client, error) {
	ep, err := ReadEndpoint(stateDir)
	if err != nil {
		return nil, err
	}
	cfg := ep.Config
	for _, o := range opts {
		o(&cfg)
	}
	c, err := Connect(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%w (daemon pid %d from %s)", err, ep.PID, EndpointPath(stateDir))
	}
	return c, nil
}

// Conn is the underlying NATS connection (for core request/reply, e.g. exec input).
func (c *Client) Conn() *nats.Conn { return c.nc }

// JetStream is the JetStream context.
func (c *Client) JetStream() jetstream.JetStream { return c.js }

// Host is the host name used as the Source of published events.
func (c *Client) Host() string { return c.host }

// Close closes the connection at once; pending publishes may be lost. Prefer Drain.
func (c *Client) Close() { c.nc.Close() }

// Drain unsubscribes everything, lets handlers finish, flushes publishes and closes.
func (c *Client) Drain(ctx context.Context) error {
	closed := make(chan struct{})
	c.nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
	if err := c.nc.Drain(); err != nil {
		if errors.Is(err, nats.ErrConnectionClosed) {
			return nil
		}
		return fmt.Errorf("broker: drain: %w", err)
	}
	select {
	case <-closed:
		return nil
	case <-ctx.Done():
		c.nc.Close()
		return fmt.Errorf("broker: drain: %w", ctx.Err())
	}
}

// Endpoint is what `virtkit serve` writes to the state dir so clients find it.
type Endpoint struct {
	Config
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	// Embedded is true when the daemon runs the NATS server itself.
	Embedded bool `json:"embedded"`
}

// EndpointPath is the endpoint file in stateDir.
func EndpointPath(stateDir string) string { return filepath.Join(stateDir, "broker", "endpoint.json") }

// WriteEndpoint atomically writes the endpoint file (mode 0600, folder 0700).
func WriteEndpoint(stateDir string, ep Endpoint) error {
	p := EndpointPath(stateDir)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("broker: write endpoint: %w", err)
	}
	data, err := json.MarshalIndent(ep, "", "  ")
	if err != nil {
		return fmt.Errorf("broker: write endpoint: %w", err)
	}
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("broker: write endpoint: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("broker: write endpoint: %w", err)
	}
	return nil
}

// RemoveEndpoint deletes the endpoint file if it still names this process.
func RemoveEndpoint(stateDir string) error {
	ep, err := readEndpointFile(stateDir)
	if err != nil || ep.PID != os.Getpid() {
		return nil
	}
	if err := os.Remove(EndpointPath(stateDir)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("broker: remove endpoint: %w", err)
	}
	return nil
}

// ReadEndpoint reads the endpoint file and checks that its daemon is alive and that the file is
// private. A missing file or a dead daemon is ErrNoDaemon.
func ReadEndpoint(stateDir string) (*Endpoint, error) {
	p := EndpointPath(stateDir)
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: no %s (start one with `virtkit serve`, or set nats.url)", ErrNoDaemon, p)
	}
	if err != nil {
		return nil, fmt.Errorf("broker: endpoint: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("broker: endpoint %s mode %v: %w", p, fi.Mode().Perm(), ErrInsecureCredential)
	}
	ep, err := readEndpointFile(stateDir)
	if err != nil {
		return nil, err
	}
	if ep.PID > 0 {
		if err := syscall.Kill(ep.PID, 0); errors.Is(err, syscall.ESRCH) {
			return nil, fmt.Errorf("%w: %s names pid %d, which is gone (stale file)", ErrNoDaemon, p, ep.PID)
		}
	}
	return ep, nil
}

func readEndpointFile(stateDir string) (*Endpoint, error) {
	p := EndpointPath(stateDir)
	data, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("broker: endpoint: %w", err)
	}
	var ep Endpoint
	if err := json.Unmarshal(data, &ep); err != nil {
		return nil, fmt.Errorf("broker: endpoint %s: %w", p, err)
	}
	if ep.URL == "" {
		return nil, fmt.Errorf("broker: endpoint %s: no url", p)
	}
	return &ep, nil
}
