package gitlab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/ci/jobs"
)

// Hooks runs GitLab Runner's custom executor stages against the pool.
type Hooks struct {
	Env *Env
	// Connect reaches the broker (the configured cluster, or the local daemon).
	Connect func(ctx context.Context) (*broker.Client, error)
	// StateDir keeps each job's placement between its hooks (<StateDir>/ci/<key>.json).
	StateDir string
	// DefaultImage is used when the job names none.
	DefaultImage string
	// PrepareTimeout bounds the wait for a host to boot the job (default 15 minutes).
	PrepareTimeout time.Duration
	// Stdout and Stderr are the job log.
	Stdout, Stderr io.Writer
	Log            zerolog.Logger
}

// state is what prepare leaves for run and cleanup.
type state struct {
	jobs.Placement
	Failed   bool `json:"failed,omitempty"`
	ExitCode int  `json:"exit_code,omitempty"`
}

func (h *Hooks) statePath() (string, error) {
	key, err := h.Env.Key()
	if err != nil {
		return "", err
	}
	return filepath.Join(h.StateDir, "ci", key+".json"), nil
}

func (h *Hooks) say(format string, args ...any) {
	fmt.Fprintln(h.Stdout, h.Env.Secrets.Redact(fmt.Sprintf(format, args...)))
}

func (h *Hooks) fail(system bool, err error) int {
	fmt.Fprintln(h.Stderr, "virtkit:", h.Env.Secrets.Redact(err.Error()))
	if system {
		return h.Env.SystemFailure
	}
	return h.Env.BuildFailure
}

func (h *Hooks) readState() (*state, string, error) {
	p, err := h.statePath()
	if err != nil {
		return nil, "", err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, p, err
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, p, fmt.Errorf("gitlab: job state %s: %w", p, err)
	}
	return &st, p, nil
}

func writeState(p string, st *state) error {
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	b, _ := json.Marshal(st)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// Prepare queues the job on the pool and waits until a host has booted its VM. It returns the
// process exit code.
func (h *Hooks) Prepare(ctx context.Context) int {
	p, err := h.statePath()
	if err != nil {
		return h.fail(true, err)
	}
	key := filepath.Base(p[:len(p)-len(".json")])
	b := make([]byte, 3)
	rand.Read(b)
	spec, err := h.Env.Spec(key+"-"+hex.EncodeToString(b), h.DefaultImage)
	if err != nil {
		return h.fail(false, err)
	}
	to := h.PrepareTimeout
	if to <= 0 {
		to = 15 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, to)
	defer cancel()
	c, err := h.Connect(ctx)
	if err != nil {
		return h.fail(true, fmt.Errorf("reach the virtkit pool: %w", err))
	}
	defer c.Close()
	h.say("Queueing job %s for a microVM (image %s) on the virtkit pool", spec.ID, spec.Image)
	pl, err := jobs.Submit(ctx, c, spec)
	if err != nil {
		var f *jobs.Failure
		return h.fail(!errors.As(err, &f) || f.System, err)
	}
	if err := writeState(p, &state{Placement: *pl}); err != nil {
		jobs.Cleanup(context.WithoutCancel(ctx), c, pl, false, 0)
		return h.fail(true, fmt.Errorf("save the job's placement: %w", err))
	}
	h.say("Running on host %s in microVM %s (ready %v after queueing)", pl.Host, pl.VM, pl.Ready.Sub(pl.Queued).Round(time.Millisecond))
	h.Log.Info().Str("job", spec.ID).Str("host", pl.Host).Dur("ready", pl.Ready.Sub(pl.Queued)).Msg("prepared")
	return 0
}

// Run runs the stage script at script in the job VM, its output streamed live. signals are the
// hook's own SIGTERM/SIGINT (GitLab's graceful kill): they are forwarded to the guest's process
// group. It returns the process exit code.
func (h *Hooks) Run(ctx context.Context, script, stage string, signals <-chan os.Signal) int {
	st, p, err := h.readState()
	if err != nil {
		return h.fail(true, fmt.Errorf("stage %s: no prepared job (%v)", stage, err))
	}
	body, err := os.ReadFile(script)
	if err != nil {
		return h.fail(true, fmt.Errorf("stage %s: read the script: %w", stage, err))
	}
	c, err := h.Connect(ctx)
	if err != nil {
		return h.fail(true, fmt.Errorf("reach the virtkit pool: %w", err))
	}
	defer c.Close()
	fwd := make(chan syscall.Signal, 4)
	go func() {
		for {
			select {
			case s, ok := <-signals:
				if !ok {
					return
				}
				if ss, ok := s.(syscall.Signal); ok {
					h.Log.Info().Str("stage", stage).Str("signal", ss.String()).Msg("forwarding to the guest")
					fwd <- ss
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	ex, err := jobs.Exec(ctx, c, &st.Placement, stage, body, h.Stdout, h.Stderr, jobs.ExecOptions{Signals: fwd})
	if err != nil {
		var f *jobs.Failure
		return h.fail(!errors.As(err, &f) || f.System, err)
	}
	if ex.Code != 0 {
		if stage != "after_script" && !st.Failed {
			st.Failed, st.ExitCode = true, ex.Code
			writeState(p, st)
		}
		return h.Env.BuildFailure
	}
	return 0
}

// Cleanup tears the job down on its host. Its result never changes the job: it returns 0 unless
// the environment is not a GitLab job at all.
func (h *Hooks) Cleanup(ctx context.Context) int {
	st, p, err := h.readState()
	if errors.Is(err, os.ErrNotExist) {
		return 0 // prepare never placed it
	}
	if err != nil {
		fmt.Fprintln(h.Stderr, "virtkit: cleanup:", h.Env.Secrets.Redact(err.Error()))
		return 0
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	c, err := h.Connect(ctx)
	if err != nil {
		fmt.Fprintln(h.Stderr, "virtkit: cleanup: reach the pool:", err, "(the host reaps the job after its timeout)")
		return 0
	}
	defer c.Close()
	if err := jobs.Cleanup(ctx, c, &st.Placement, st.Failed, st.ExitCode); err != nil {
		fmt.Fprintln(h.Stderr, "virtkit: cleanup:", h.Env.Secrets.Redact(err.Error()), "(the host reaps the job after its timeout)")
	}
	os.Remove(p)
	return 0
}
