package client

import (
	"context"
	"errors"
	"io"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/virtkit/virtkit/agent/proto"
)

// Terminal is the local side of an attached command: the process's stdio, typically.
type Terminal struct {
	Stdin          *os.File // nil: no input
	Stdout, Stderr io.Writer
	// Interactive streams Stdin to the command; otherwise its stdin is closed at once.
	Interactive bool
}

// Attach runs req with the local terminal attached, the way `docker run -it` or ssh do: with
// req.TTY the local terminal is put in raw mode and its size follows SIGWINCH; SIGINT, SIGTERM,
// SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 received by this process are forwarded to the guest command
// instead of ending it. It returns the command's exit status.
func (c *Client) Attach(ctx context.Context, req ExecRequest, t Terminal) (ExitStatus, error) {
	// Signals go to the guest command, so the session must not end with ours.
	sctx := context.WithoutCancel(ctx)
	outFd := -1
	if f, ok := t.Stdout.(*os.File); ok {
		outFd = int(f.Fd())
	}
	if req.TTY {
		if ws, err := unix.IoctlGetWinsize(outFd, unix.TIOCGWINSZ); err == nil && outFd >= 0 {
			req.Rows, req.Cols = ws.Row, ws.Col
		}
		if v := os.Getenv("TERM"); v != "" {
			req.Env = append([]string{"TERM=" + v}, req.Env...)
		}
	}
	s, err := c.StartIO(sctx, req, t.Stdout, t.Stderr)
	if err != nil {
		return ExitStatus{}, err
	}
	if req.TTY && t.Stdin != nil && term.IsTerminal(int(t.Stdin.Fd())) {
		if old, err := term.MakeRaw(int(t.Stdin.Fd())); err == nil {
			defer term.Restore(int(t.Stdin.Fd()), old)
		}
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH)
	defer signal.Stop(sigs)
	go func() {
		for {
			select {
			case sig := <-sigs:
				if sig == syscall.SIGWINCH {
					if ws, err := unix.IoctlGetWinsize(outFd, unix.TIOCGWINSZ); err == nil {
						s.Resize(ws.Row, ws.Col)
					}
					continue
				}
				s.Signal(sig.(syscall.Signal))
			case <-s.Done():
				return
			}
		}
	}()
	in := s.Stdin()
	if t.Interactive && t.Stdin != nil {
		go func() {
			if _, err := io.Copy(in, t.Stdin); err == nil {
				in.Close()
			}
		}()
	} else {
		in.Close()
	}
	return s.Wait()
}

// ExitCode maps a failure to start a guest command to a shell-like exit code: 127 when the command
// does not exist, 126 when it may not or cannot be executed, 255 for agent or transport failures
// (as ssh does).
func ExitCode(err error) int {
	var re *proto.RemoteError
	if errors.As(err, &re) {
		switch re.Code {
		case proto.CodeNotFound:
			return 127
		case proto.CodeDenied, proto.CodeExec:
			return 126
		}
	}
	return 255
}
