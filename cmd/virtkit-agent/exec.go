package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"golang.org/x/term"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/agent/proto"
)

func init() {
	register("exec", "run a command in the guest: exec --connect URL [-t] [-e K=V] [-w DIR] [-u USER] -- CMD...", runExec)
}

func runExec(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("exec", flag.ContinueOnError)
	connect := fs.String("connect", os.Getenv("VIRTKIT_AGENT"), "agent endpoint URL (default $VIRTKIT_AGENT)")
	tty := fs.Bool("t", false, "allocate a terminal")
	interactive := fs.Bool("i", true, "pass stdin to the command")
	var envs repeatFlag
	fs.Var(&envs, "e", "KEY=VALUE (or KEY, taken from here) for the command; repeatable")
	dir := fs.String("w", "", "working directory in the guest")
	user := fs.String("u", "", "user: name, uid, name:group or uid:gid")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	argv := fs.Args()
	if *connect == "" || len(argv) == 0 {
		fmt.Fprintln(os.Stderr, "usage: virtkit-agent exec --connect URL [-t] [-e K=V] [-w DIR] [-u USER] -- CMD...")
		return 2
	}
	req := client.ExecRequest{Argv: argv, Dir: *dir, User: *user, TTY: *tty}
	for _, e := range envs {
		if !strings.Contains(e, "=") {
			e += "=" + os.Getenv(e)
		}
		req.Env = append(req.Env, e)
	}
	code, err := execRemote(ctx, *connect, req, *interactive)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent exec:", err)
		return errorCode(err)
	}
	return code
}

// execRemote runs req and relays stdin, signals and terminal size; it returns the exit code.
func execRemote(ctx context.Context, url string, req client.ExecRequest, interactive bool) (int, error) {
	// Signals go to the guest command, so the session must not end with ours.
	sctx := context.WithoutCancel(ctx)
	c, err := client.Dial(sctx, url)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	inFd := int(os.Stdin.Fd())
	isTerm := term.IsTerminal(inFd)
	if req.TTY {
		if ws, err := unixWinsize(int(os.Stdout.Fd())); err == nil {
			req.Rows, req.Cols = ws[0], ws[1]
		}
		if t := os.Getenv("TERM"); t != "" {
			req.Env = append([]string{"TERM=" + t}, req.Env...)
		}
	}
	s, err := c.StartIO(sctx, req, os.Stdout, os.Stderr)
	if err != nil {
		return 0, err
	}
	if req.TTY && isTerm {
		if old, err := term.MakeRaw(inFd); err == nil {
			defer term.Restore(inFd, old)
		}
	}
	sigs := make(chan os.Signal, 8)
	fwd := []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH}
	signal.Notify(sigs, fwd...)
	defer signal.Stop(sigs)
	go func() {
		for {
			select {
			case sig := <-sigs:
				if sig == syscall.SIGWINCH {
					if ws, err := unixWinsize(int(os.Stdout.Fd())); err == nil {
						s.Resize(ws[0], ws[1])
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
	if interactive {
		go func() {
			if _, err := io.Copy(in, os.Stdin); err == nil {
				in.Close()
			}
		}()
	} else {
		in.Close()
	}
	st, err := s.Wait()
	if err != nil {
		return 0, err
	}
	return st.Code, nil
}

// errorCode maps a failure to run the command to a shell-like exit code: 127 not found,
// 126 not allowed or not executable, 255 for agent or transport failures (as ssh does).
func errorCode(err error) int {
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
