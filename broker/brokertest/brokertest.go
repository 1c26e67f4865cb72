// Package brokertest runs real NATS servers for tests: an embedded server in t.TempDir(), and
// `virtkit serve` as a child process that a test can kill without warning (a crash) and restart
// from the same store. Everything it starts is stopped in t.Cleanup, even when the test fails.
package brokertest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// Server starts an embedded server whose state lives in dir (t.TempDir() when empty).
func Server(t testing.TB, dir string) *broker.Server {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := broker.StartServer(ctx, broker.ServerConfig{StateDir: dir})
	if err != nil {
		t.Fatalf("brokertest: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("brokertest: %v", err)
		}
	})
	return srv
}

// Connect connects to cfg as host and closes the client in t.Cleanup.
func Connect(t testing.TB, cfg broker.Config, host string) *broker.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cfg.Host = host
	c, err := broker.Connect(ctx, cfg)
	if err != nil {
		t.Fatalf("brokertest: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

// Start is Server + Provision(DefaultSchema(o)) + Connect as host "h1".
func Start(t testing.TB, o broker.SchemaOptions) (*broker.Server, *broker.Client) {
	t.Helper()
	srv := Server(t, "")
	c := Connect(t, srv.ClientConfig(), "h1")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := broker.Provision(ctx, c.JetStream(), broker.DefaultSchema(o)); err != nil {
		t.Fatalf("brokertest: %v", err)
	}
	return srv, c
}

// Daemon is `virtkit serve` running as a child process.
type Daemon struct {
	t        testing.TB
	StateDir string
	Log      string
	cmd      *exec.Cmd
	exited   chan struct{}
	err      error
}

// Serve runs `virtkit serve` (built with cmdtest.Binary) on stateDir with an empty config, host
// name "testhost" and only the broker's own workers (projector, heartbeat; pass "--workers",
// "all" or a list to change that), and waits until its endpoint file names it. Extra args go to
// serve.
func Serve(t testing.TB, stateDir string, args ...string) *Daemon {
	t.Helper()
	bin := cmdtest.Binary(t, "virtkit")
	cfgFile := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(cfgFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.CreateTemp(t.TempDir(), "serve-*.log")
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, append([]string{"serve", "--state-dir", stateDir, "--log-level", "debug", "--workers", "projector,heartbeat"}, args...)...)
	cmd.Env = append(os.Environ(), "VIRTKIT_CONFIG="+cfgFile, "VIRTKIT_HOST=testhost")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("brokertest: start virtkit serve: %v", err)
	}
	d := &Daemon{t: t, StateDir: stateDir, Log: logf.Name(), cmd: cmd, exited: make(chan struct{})}
	go func() { d.err = cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			_ = cmd.Process.Kill()
			<-d.exited
		}
		if t.Failed() {
			d.dumpLog()
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		ep, err := broker.ReadEndpoint(stateDir)
		if err == nil && ep.PID == cmd.Process.Pid {
			return d
		}
		select {
		case <-d.exited:
			d.dumpLog()
			t.Fatalf("brokertest: virtkit serve exited before it was ready: %v", d.err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.dumpLog()
			t.Fatalf("brokertest: virtkit serve not ready after 60s (last: %v)", err)
		}
	}
}

func (d *Daemon) dumpLog() {
	b, _ := os.ReadFile(d.Log)
	if len(b) > 20000 {
		b = b[len(b)-20000:]
	}
	d.t.Logf("virtkit serve log (%s):\n%s", d.Log, b)
}

// PID is the daemon's process id.
func (d *Daemon) PID() int { return d.cmd.Process.Pid }

// Kill crashes the daemon: SIGKILL, no chance to flush or shut down.
func (d *Daemon) Kill() {
	d.t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		d.t.Fatalf("brokertest: kill: %v", err)
	}
	<-d.exited
}

// Stop sends SIGTERM and waits for a clean exit (status 0) for at most timeout.
func (d *Daemon) Stop(timeout time.Duration) error {
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("brokertest: SIGTERM: %w", err)
	}
	select {
	case <-d.exited:
		var ee *exec.ExitError
		if errors.As(d.err, &ee) {
			return fmt.Errorf("brokertest: virtkit serve exited with %v", ee)
		}
		return d.err
	case <-time.After(timeout):
		return fmt.Errorf("brokertest: virtkit serve still running %v after SIGTERM", timeout)
	}
}

// Connect connects to the daemon through its endpoint file, as host.
func (d *Daemon) Connect(host string) *broker.Client {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := broker.ConnectLocal(ctx, d.StateDir, broker.WithHost(host))
	if err != nil {
		d.t.Fatalf("brokertest: %v", err)
	}
	d.t.Cleanup(c.Close)
	return c
}
