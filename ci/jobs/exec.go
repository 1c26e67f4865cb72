package jobs

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/broker"
)

// ScriptDir is where stage scripts are copied in the guest.
const ScriptDir = "/tmp/virtkit-ci"

// MaxScript bounds a stage script (it travels in one NATS message).
const MaxScript = 512 << 10

var execIDPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)

// scriptRunner runs the copied script with bash when the image has it, else sh. The file is
// opened and removed first, so no stage script (and no secret in it) stays on disk.
const scriptRunner = `exec 9<"$0" && rm -f "$0" || exit 1; if command -v bash >/dev/null 2>&1; then exec bash /dev/fd/9; fi; exec sh /dev/fd/9`

func (r *Runner) onExec(m *nats.Msg) {
	var req ExecRequest
	if err := json.Unmarshal(m.Data, &req); err != nil {
		respond(m, Reply{Error: "bad exec request: " + err.Error()})
		return
	}
	if !execIDPattern.MatchString(req.Exec) {
		respond(m, Reply{Error: fmt.Sprintf("bad exec id %q", req.Exec)})
		return
	}
	j := r.lookup(req.Job)
	if j == nil {
		respond(m, Reply{Unknown: true, Error: fmt.Sprintf("job %s does not run on host %s (reaped or never started)", req.Job, r.host)})
		return
	}
	r.exec(j, req, m)
}

// exec copies the script in, starts it, replies to the hook and relays output until it ends.
func (r *Runner) exec(j *job, req ExecRequest, m *nats.Msg) {
	log := j.log.With().Str("exec", req.Exec).Str("stage", req.Stage).Logger()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-j.gone:
			cancel()
		case <-ctx.Done():
		}
	}()

	path := ScriptDir + "/" + req.Exec + ".sh"
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Name: req.Exec + ".sh", Mode: 0o700, Size: int64(len(req.Script)), Typeflag: tar.TypeReg, ModTime: time.Now()})
	tw.Write(req.Script)
	tw.Close()
	cctx, ccancel := context.WithTimeout(ctx, time.Minute)
	err := j.agent.CopyIn(cctx, ScriptDir, &tb)
	ccancel()
	if err != nil {
		respond(m, Reply{Error: fmt.Sprintf("copy the stage script into the job VM: %v", err)})
		return
	}

	// Output goes to the exec stream with async publishes (ordered on this connection); the exit
	// message is published after every output message was stored.
	js := r.cfg.Client.JetStream()
	var seq atomic.Int64
	var pubErr atomic.Value
	out := func(channel string) writerFunc {
		subj := broker.ExecSubject(req.Exec, channel)
		return func(p []byte) (int, error) {
			msg := nats.NewMsg(subj)
			msg.Data = append([]byte(nil), p...)
			id := req.Exec + "-" + strconv.FormatInt(seq.Add(1), 10)
			for {
				_, err := js.PublishMsgAsync(msg, jetstream.WithMsgID(id))
				if err == nil {
					return len(p), nil
				}
				if err != jetstream.ErrTooManyStalledMsgs {
					pubErr.Store(err)
					return 0, err
				}
				select {
				case <-js.PublishAsyncComplete():
				case <-time.After(time.Second):
				}
			}
		}
	}

	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var sessMu sync.Mutex
	var sess *client.Session
	sigSub, err := r.cfg.Client.Conn().Subscribe(broker.ExecSubject(req.Exec, broker.ExecSignal), func(sm *nats.Msg) {
		last.Store(time.Now().UnixNano())
		var s Signal
		if json.Unmarshal(sm.Data, &s) != nil {
			return
		}
		sessMu.Lock()
		cur := sess
		sessMu.Unlock()
		if s.Signal != 0 && cur != nil {
			log.Info().Int("signal", s.Signal).Msg("forwarding signal to the stage's process group")
			cur.Signal(syscall.Signal(s.Signal))
		}
		sm.Respond([]byte(`{"ok":true}`))
	})
	if err != nil {
		respond(m, Reply{Error: err.Error()})
		return
	}
	defer sigSub.Unsubscribe()

	ereq := client.ExecRequest{Argv: []string{"/bin/sh", "-c", scriptRunner, path}, Env: req.Env}
	s, err := j.agent.StartIO(ctx, ereq, out(broker.ExecStdout), out(broker.ExecStderr))
	if err != nil {
		respond(m, Reply{Error: fmt.Sprintf("start the stage in the job VM: %v", err)})
		return
	}
	j.mu.Lock()
	if j.ended {
		j.mu.Unlock()
		s.Close()
		respond(m, Reply{Error: "the job is being cleaned up"})
		return
	}
	j.execs[req.Exec] = s
	j.mu.Unlock()
	sessMu.Lock()
	sess = s
	sessMu.Unlock()
	defer func() {
		j.mu.Lock()
		delete(j.execs, req.Exec)
		j.mu.Unlock()
	}()
	respond(m, Reply{OK: true})
	log.Debug().Int("pid", s.Pid).Msg("stage started")

	// The lease: a hook that goes silent was killed (or its machine vanished); kill the stage.
	lease := time.NewTicker(r.cfg.LeaseTimeout / 4)
	defer lease.Stop()
	var st client.ExitStatus
	var serr error
wait:
	for {
		select {
		case <-s.Done():
			st, serr = s.Wait()
			break wait
		case <-lease.C:
			if time.Since(time.Unix(0, last.Load())) > r.cfg.LeaseTimeout {
				log.Warn().Dur("lease", r.cfg.LeaseTimeout).Msg("the run hook went silent; killing the stage")
				s.Signal(syscall.SIGKILL)
				s.Close()
			}
		}
	}
	ex := Exit{Code: st.Code, Signal: st.Signal}
	if serr != nil {
		ex = Exit{Code: -1, Error: fmt.Sprintf("the stage's end is unknown: %v", serr)}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		ex = Exit{Code: -1, Error: "output could not be stored in the exec stream within 30s"}
	}
	if e, ok := pubErr.Load().(error); ok && ex.Error == "" {
		ex = Exit{Code: -1, Error: fmt.Sprintf("output lost: %v", e)}
	}
	b, _ := json.Marshal(ex)
	pctx, pcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer pcancel()
	if _, err := js.Publish(pctx, broker.ExecSubject(req.Exec, broker.ExecExit), b, jetstream.WithMsgID(req.Exec+"-exit")); err != nil {
		log.Error().Err(err).Msg("publish the stage's exit")
	}
	log.Info().Int("code", ex.Code).Str("error", ex.Error).Msg("stage ended")
}

type writerFunc func(p []byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
