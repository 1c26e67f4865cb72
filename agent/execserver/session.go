package execserver

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/agent/proto"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// baseEnv returns env with a PATH, deduplicated (last wins).
func baseEnv(env []string) []string {
	out := mergeEnv([]string{"PATH=" + defaultPath}, env)
	return out
}

// mergeEnv returns base with over applied on top, keys kept in first-seen order.
func mergeEnv(base, over []string) []string {
	out := slices.Clone(base)
	idx := map[string]int{}
	for i, kv := range out {
		k, _, _ := strings.Cut(kv, "=")
		idx[k] = i
	}
	for _, kv := range over {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}

func getenv(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v
		}
	}
	return ""
}

// lookPath resolves a program name through the session's PATH (not the agent's).
func lookPath(name, path string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%q: %w in PATH %s", name, fs.ErrNotExist, path)
}

// command builds the process for an exec request, applying the allow-list and wrapper.
func (s *Server) command(req proto.Exec) (*exec.Cmd, string, error) {
	cmd, code, err := BuildCommand(s.cfg.Env, req)
	if err != nil {
		return nil, code, err
	}
	prog := cmd.Path
	if len(s.cfg.Allow) > 0 && !slices.Contains(s.cfg.Allow, prog) && !slices.Contains(s.cfg.Allow, req.Argv[0]) {
		return nil, proto.CodeDenied, fmt.Errorf("exec: %s is not on the agent's allow-list", prog)
	}
	if len(s.cfg.Wrapper) > 0 {
		cmd.Args = append(slices.Clone(s.cfg.Wrapper), append([]string{prog}, cmd.Args[1:]...)...)
		cmd.Path = cmd.Args[0]
		if p, err := lookPath(cmd.Path, getenv(cmd.Env, "PATH")); err == nil {
			cmd.Path = p
		}
	}
	return cmd, "", nil
}

// BuildCommand resolves an exec request into a process (not started) the way sessions run: env
// is the base environment (PATH defaulted), the user's HOME/USER/LOGNAME are set, argv[0] is
// resolved through the resulting PATH, and Dir defaults to the user's home (or /). The error
// code is a proto.Code* value.
func BuildCommand(env []string, req proto.Exec) (*exec.Cmd, string, error) {
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		return nil, proto.CodeExec, errors.New("exec: empty argv")
	}
	id, err := resolveUser(req.User)
	if err != nil {
		return nil, proto.CodeNotFound, fmt.Errorf("exec: %w", err)
	}
	env = mergeEnv(baseEnv(env), []string{"HOME=" + id.home})
	if id.name != "" {
		env = mergeEnv(env, []string{"USER=" + id.name, "LOGNAME=" + id.name})
	}
	if req.TTY && getenv(env, "TERM") == "" {
		env = mergeEnv(env, []string{"TERM=xterm"})
	}
	env = mergeEnv(env, req.Env)
	prog, err := lookPath(req.Argv[0], getenv(env, "PATH"))
	if err != nil {
		return nil, proto.CodeNotFound, fmt.Errorf("exec: %w", err)
	}
	dir := req.Dir
	if dir == "" {
		dir = id.home
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			dir = "/"
		}
	}
	if fi, err := os.Stat(dir); err != nil {
		return nil, proto.CodeNotFound, fmt.Errorf("exec: working directory: %w", err)
	} else if !fi.IsDir() {
		return nil, proto.CodeNotFound, fmt.Errorf("exec: working directory %s is not a folder", dir)
	}
	cmd := &exec.Cmd{Path: prog, Args: slices.Clone(req.Argv), Env: env, Dir: dir}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: id.cred}
	return cmd, "", nil
}

// session is one running exec.
type session struct {
	s     *Server
	w     *proto.Writer
	pgid  int
	tty   *os.File // pty master, nil without TTY
	stdin *os.File // write end of the stdin pipe (or tty)

	mu       sync.Mutex
	cond     *sync.Cond
	queue    [][]byte
	queued   int
	closeIn  bool
	inDone   bool
	exited   atomic.Bool
	outFiles []*os.File
}

// exec runs a session on a dedicated connection until the process has exited and its output has
// been sent, or the client has gone (then the process group is killed).
func (s *Server) exec(c net.Conn, r *proto.Reader, w *proto.Writer, req proto.Exec) {
	cmd, code, err := s.command(req)
	if err != nil {
		s.fail(w, code, err)
		return
	}
	ss := &session{s: s, w: w}
	ss.cond = sync.NewCond(&ss.mu)
	var child []*os.File
	closeAll := func(fs []*os.File) {
		for _, f := range fs {
			if f != nil {
				f.Close()
			}
		}
	}
	if req.TTY {
		m, sl, err := openPTY(req.Rows, req.Cols)
		if err != nil {
			s.fail(w, proto.CodeExec, fmt.Errorf("exec: %w", err))
			return
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = sl, sl, sl
		cmd.SysProcAttr.Setsid, cmd.SysProcAttr.Setctty, cmd.SysProcAttr.Ctty = true, true, 0
		ss.tty, ss.stdin = m, m
		ss.outFiles = []*os.File{m}
		child = []*os.File{sl}
	} else {
		inR, inW, err1 := os.Pipe()
		outR, outW, err2 := os.Pipe()
		errR, errW, err3 := os.Pipe()
		if err := errors.Join(err1, err2, err3); err != nil {
			closeAll([]*os.File{inR, inW, outR, outW, errR, errW})
			s.fail(w, proto.CodeExec, fmt.Errorf("exec: pipes: %w", err))
			return
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
		cmd.SysProcAttr.Setpgid = true
		ss.stdin = inW
		ss.outFiles = []*os.File{outR, errR}
		child = []*os.File{inR, outW, errW}
	}
	p, err := s.reaper.Start(cmd)
	closeAll(child)
	if err != nil {
		closeAll(ss.outFiles)
		if ss.tty == nil {
			ss.stdin.Close()
		}
		code := proto.CodeExec
		if errors.Is(err, fs.ErrNotExist) {
			code = proto.CodeNotFound // an explicit path that does not exist: 127, as a shell says
		}
		s.fail(w, code, fmt.Errorf("exec %s: %w", req.Argv[0], err))
		return
	}
	ss.pgid = p.Pid
	s.debugf("session %d started: %q", p.Pid, req.Argv)
	if err := w.WriteJSON(proto.TStarted, proto.Started{Pid: p.Pid}); err != nil {
		ss.kill()
	}

	var pumps sync.WaitGroup
	types := []proto.Type{proto.TStdout, proto.TStderr}
	for i, f := range ss.outFiles {
		pumps.Add(1)
		go func() {
			defer pumps.Done()
			ss.pump(f, types[i])
		}()
	}
	stdinDone := make(chan struct{})
	go func() {
		defer close(stdinDone)
		ss.stdinLoop()
	}()
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		ss.readLoop(r)
	}()

	st := p.Wait()
	ss.exited.Store(true)
	for _, f := range ss.outFiles {
		// Keep reading what is buffered; stop once output goes quiet (orphans may hold it open).
		f.SetReadDeadline(time.Now().Add(s.cfg.DrainIdle))
	}
	pumps.Wait()
	ex := proto.Exit{Code: st.Code, Signal: st.Signal}
	_ = w.WriteJSON(proto.TExit, ex)
	s.debugf("session %d ended: code %d signal %d", p.Pid, st.Code, st.Signal)

	ss.mu.Lock()
	ss.inDone = true
	ss.cond.Broadcast()
	ss.mu.Unlock()
	// Closing unblocks a stdin write an orphan holding the pipe would never consume.
	closeAll(ss.outFiles)
	if ss.tty == nil {
		ss.stdin.Close()
	}
	<-stdinDone
	// The client closes after Exit; do not wait forever for a client that does not.
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	<-readerDone
}

// pump copies one output stream into frames until EOF, an error, or quiet after exit.
func (ss *session) pump(f *os.File, t proto.Type) {
	buf := make([]byte, proto.HeaderLen+proto.DataChunk)
	for {
		n, err := f.Read(buf[proto.HeaderLen:])
		if n > 0 {
			if werr := ss.w.WriteRaw(t, buf[:proto.HeaderLen+n]); werr != nil {
				ss.kill()
				return
			}
			if ss.exited.Load() {
				f.SetReadDeadline(time.Now().Add(ss.s.cfg.DrainIdle))
			}
		}
		if err != nil {
			// EOF, EIO (pty: all slaves closed) or the drain deadline.
			return
		}
	}
}

// readLoop handles the client's frames; a read error means the client is gone.
func (ss *session) readLoop(r *proto.Reader) {
	for {
		f, err := r.Read()
		if err != nil {
			if !ss.exited.Load() {
				ss.s.debugf("session %d: client gone (%v), killing it", ss.pgid, err)
				ss.kill()
			}
			ss.closeStdin()
			return
		}
		switch f.Type {
		case proto.TStdin:
			ss.mu.Lock()
			if ss.queued+len(f.Payload) > proto.StdinWindow {
				ss.mu.Unlock()
				ss.s.fail(ss.w, proto.CodeProtocol, errors.New("stdin beyond the granted window"))
				ss.kill()
				return
			}
			ss.queue = append(ss.queue, slices.Clone(f.Payload))
			ss.queued += len(f.Payload)
			ss.cond.Broadcast()
			ss.mu.Unlock()
		case proto.TStdinClose:
			ss.closeStdin()
		case proto.TSignal:
			var sig proto.Signal
			if proto.Decode(f, &sig) == nil && sig.Signal > 0 && sig.Signal < 65 {
				_ = unix.Kill(-ss.signalGroup(), syscall.Signal(sig.Signal))
			}
		case proto.TResize:
			var rs proto.Resize
			if proto.Decode(f, &rs) == nil && ss.tty != nil {
				_ = setSize(ss.tty, rs.Rows, rs.Cols)
			}
		default:
			ss.s.fail(ss.w, proto.CodeProtocol, fmt.Errorf("%w: unexpected %s frame in a session", proto.ErrFrame, f.Type))
			ss.kill()
			return
		}
	}
}

func (ss *session) closeStdin() {
	ss.mu.Lock()
	ss.closeIn = true
	ss.cond.Broadcast()
	ss.mu.Unlock()
}

// stdinLoop writes queued stdin to the process and returns credit as it goes.
func (ss *session) stdinLoop() {
	broken := false
	for {
		ss.mu.Lock()
		for len(ss.queue) == 0 && !ss.closeIn && !ss.inDone {
			ss.cond.Wait()
		}
		if ss.inDone {
			ss.mu.Unlock()
			return
		}
		if len(ss.queue) == 0 && ss.closeIn {
			ss.mu.Unlock()
			if !broken {
				if ss.tty != nil {
					// End of input on a terminal is the EOF character (^D) at a line start.
					_, _ = ss.tty.Write([]byte{4})
				} else {
					ss.stdin.Close()
				}
			}
			ss.mu.Lock()
			for !ss.inDone {
				ss.cond.Wait()
			}
			ss.mu.Unlock()
			return
		}
		b := ss.queue[0]
		ss.queue = ss.queue[1:]
		ss.mu.Unlock()
		if !broken {
			if _, err := ss.stdin.Write(b); err != nil {
				// The process closed its stdin: drop input from now on, like a closed pipe.
				broken = true
			}
		}
		ss.mu.Lock()
		ss.queued -= len(b)
		ss.mu.Unlock()
		if ss.w.WriteJSON(proto.TWindow, proto.Window{N: uint32(len(b))}) != nil {
			return
		}
	}
}

// signalGroup is who a signal is for: the terminal's foreground process group (a job-control
// shell puts its current job there), else the session's own group.
func (ss *session) signalGroup() int {
	if ss.tty != nil {
		if pg, err := unix.IoctlGetInt(int(ss.tty.Fd()), unix.TIOCGPGRP); err == nil && pg > 0 {
			return pg
		}
	}
	return ss.pgid
}

// kill ends the session's whole process group.
func (ss *session) kill() {
	if ss.pgid > 0 && !ss.exited.Load() {
		_ = unix.Kill(-ss.pgid, unix.SIGKILL)
		_ = unix.Kill(ss.pgid, unix.SIGKILL)
	}
}
