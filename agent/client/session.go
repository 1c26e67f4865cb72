package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"

	"github.com/virtkit/virtkit/agent/proto"
)

// ExecRequest describes a command to run in the guest.
type ExecRequest struct {
	Argv, Env  []string // Env: KEY=VALUE on top of the agent's base environment
	Dir, User  string   // User: name, uid, name:group or uid:gid
	TTY        bool
	Rows, Cols uint16
}

// ExitStatus is how a guest command ended. Code is 128+Signal when a signal killed it.
type ExitStatus struct {
	Code   int
	Signal int
}

// ErrSessionClosed is returned by writes to a session that has ended.
var ErrSessionClosed = errors.New("agent session closed")

// Session is a running command.
type Session struct {
	Pid int

	cn     *conn
	stdout io.Writer
	stderr io.Writer
	pipes  []*io.PipeWriter
	outR   *io.PipeReader
	errR   *io.PipeReader
	stop   func() bool

	mu      sync.Mutex
	cond    *sync.Cond
	credit  int
	inClose bool
	ended   bool

	done   chan struct{}
	status ExitStatus
	err    error
}

// Exec runs a command to completion: stdin (nil: empty) is streamed in, output is written to
// stdout and stderr (nil: discarded). Cancelling ctx kills the command.
func (c *Client) Exec(ctx context.Context, req ExecRequest, stdin io.Reader, stdout, stderr io.Writer) (ExitStatus, error) {
	s, err := c.StartIO(ctx, req, stdout, stderr)
	if err != nil {
		return ExitStatus{}, err
	}
	in := s.Stdin()
	if stdin == nil {
		in.Close()
	} else {
		go func() {
			// Ends at stdin EOF, or at the first read after the session ended.
			if _, err := io.Copy(in, stdin); err == nil {
				in.Close()
			}
		}()
	}
	return s.Wait()
}

// Start starts a command whose output is read from Stdout and Stderr. Both must be read (or the
// session stalls, by design: output is never buffered without bound).
func (c *Client) Start(ctx context.Context, req ExecRequest) (*Session, error) {
	outR, outW := io.Pipe()
	errR, errW := io.Pipe()
	s, err := c.StartIO(ctx, req, outW, errW)
	if err != nil {
		return nil, err
	}
	s.outR, s.errR = outR, errR
	s.pipes = []*io.PipeWriter{outW, errW}
	return s, nil
}

// StartIO starts a command whose output goes to stdout and stderr (nil: discarded).
func (c *Client) StartIO(ctx context.Context, req ExecRequest, stdout, stderr io.Writer) (*Session, error) {
	if len(req.Argv) == 0 {
		return nil, errors.New("agent exec: empty argv")
	}
	cn, _, err := c.open(ctx, proto.TExec, proto.Exec{Argv: req.Argv, Env: req.Env, Dir: req.Dir, User: req.User, TTY: req.TTY, Rows: req.Rows, Cols: req.Cols})
	if err != nil {
		return nil, err
	}
	stop := deadline(ctx, cn.c)
	f, err := cn.expect(proto.TStarted)
	stop()
	if err != nil {
		cn.Close()
		return nil, fmt.Errorf("agent %s: exec %s: %w", c.addr, req.Argv[0], err)
	}
	var st proto.Started
	if err := proto.Decode(f, &st); err != nil {
		cn.Close()
		return nil, err
	}
	if stdout == nil {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	s := &Session{Pid: st.Pid, cn: cn, stdout: stdout, stderr: stderr, credit: proto.StdinWindow, done: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	s.stop = context.AfterFunc(ctx, func() { cn.Close() })
	go s.readLoop(ctx)
	return s, nil
}

func (s *Session) readLoop(ctx context.Context) {
	defer func() {
		s.mu.Lock()
		s.ended = true
		s.cond.Broadcast()
		s.mu.Unlock()
		for _, p := range s.pipes {
			p.CloseWithError(s.err)
		}
		close(s.done)
	}()
	outOK, errOK := true, true
	for {
		f, err := s.cn.r.Read()
		if err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			} else if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				err = fmt.Errorf("agent connection lost before the command's exit status: %w", io.ErrUnexpectedEOF)
			}
			s.err = err
			return
		}
		switch f.Type {
		case proto.TStdout:
			// A failing local writer must not stall the remote command: drop its output.
			if outOK {
				_, werr := s.stdout.Write(f.Payload)
				outOK = werr == nil
			}
		case proto.TStderr:
			if errOK {
				_, werr := s.stderr.Write(f.Payload)
				errOK = werr == nil
			}
		case proto.TWindow:
			var w proto.Window
			if proto.Decode(f, &w) == nil {
				s.mu.Lock()
				s.credit += int(w.N)
				s.cond.Broadcast()
				s.mu.Unlock()
			}
		case proto.TExit:
			var ex proto.Exit
			if err := proto.Decode(f, &ex); err != nil {
				s.err = err
				return
			}
			s.status = ExitStatus(ex)
			return
		case proto.TError:
			s.err = remoteErr(f)
			return
		default:
			s.err = fmt.Errorf("%w: unexpected %s in a session", proto.ErrFrame, f.Type)
			return
		}
	}
}

// Stdout is the command's output when started with Start.
func (s *Session) Stdout() io.Reader { return s.outR }

// Stderr is the command's error output when started with Start.
func (s *Session) Stderr() io.Reader { return s.errR }

// Stdin is the command's input; Close sends end-of-file.
func (s *Session) Stdin() io.WriteCloser { return stdinWriter{s} }

type stdinWriter struct{ s *Session }

func (w stdinWriter) Write(p []byte) (int, error) {
	s := w.s
	n := 0
	for len(p) > 0 {
		s.mu.Lock()
		for s.credit == 0 && !s.ended && !s.inClose {
			s.cond.Wait()
		}
		if s.ended || s.inClose {
			s.mu.Unlock()
			return n, ErrSessionClosed
		}
		c := min(len(p), s.credit, proto.DataChunk)
		s.credit -= c
		s.mu.Unlock()
		if err := s.cn.w.Write(proto.TStdin, p[:c]); err != nil {
			return n, err
		}
		n += c
		p = p[c:]
	}
	return n, nil
}

func (w stdinWriter) Close() error {
	s := w.s
	s.mu.Lock()
	if s.inClose || s.ended {
		s.mu.Unlock()
		return nil
	}
	s.inClose = true
	s.cond.Broadcast()
	s.mu.Unlock()
	return s.cn.w.Write(proto.TStdinClose, nil)
}

// Signal sends sig to the command's process group.
func (s *Session) Signal(sig syscall.Signal) error {
	return s.cn.w.WriteJSON(proto.TSignal, proto.Signal{Signal: int(sig)})
}

// Resize sets the command's terminal size (TTY sessions).
func (s *Session) Resize(rows, cols uint16) error {
	return s.cn.w.WriteJSON(proto.TResize, proto.Resize{Rows: rows, Cols: cols})
}

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// Wait waits for the command to end and returns its exit status.
func (s *Session) Wait() (ExitStatus, error) {
	<-s.done
	s.stop()
	s.cn.Close()
	return s.status, s.err
}

// Close abandons the session: the agent kills the command's process group.
func (s *Session) Close() error {
	s.stop()
	return s.cn.Close()
}
