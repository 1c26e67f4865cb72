package initproc

import (
	"errors"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/agent/execserver"
	"github.com/virtkit/virtkit/agent/proto"
)

// image is the image config with the host's overrides (virtkit.command, virtkit.env) applied:
// what the entrypoint runs and the env exec sessions start from. With a command override the
// image config may be missing.
func (in *Init) image() (Image, error) {
	var im Image
	b, err := os.ReadFile(in.cfg.Image)
	if err == nil {
		im, err = ParseImage(b)
	}
	if err != nil && (len(in.cfg.Command) == 0 || !errors.Is(err, os.ErrNotExist)) {
		return Image{}, err
	}
	return im.With(in.cfg.Command, in.cfg.Env), nil
}

// runEntrypoint runs the image's command with its env, workdir and user, forwarding signals to
// it, and returns its exit code once it has ended (and any linger time has passed).
func (in *Init) runEntrypoint(sigs <-chan os.Signal) (code int, poweroff bool) {
	finish := func(ex proto.Exit) (int, bool) {
		in.mu.Lock()
		if in.ep == nil {
			in.ep = &proto.Entrypoint{}
		}
		in.ep.Running = false
		in.ep.Exit = &ex
		in.mu.Unlock()
		close(in.epEnd)
		in.reportExit(ex.Code)
		poweroff := true
		if in.cfg.Linger > 0 {
			select {
			case <-time.After(in.cfg.Linger):
			case poweroff = <-in.shutdown:
			}
		}
		return ex.Code, poweroff
	}
	if in.volErr != nil {
		in.log("entrypoint not started: %v", in.volErr)
		return finish(proto.Exit{Code: 125})
	}
	im, err := in.image()
	if err != nil {
		in.log("entrypoint: image config %s: %v", in.cfg.Image, err)
		return finish(proto.Exit{Code: 127})
	}
	argv := im.Argv()
	if len(argv) == 0 {
		in.log("entrypoint: %s has neither entrypoint nor cmd", in.cfg.Image)
		return finish(proto.Exit{Code: 127})
	}
	cmd, _, err := execserver.BuildCommand(im.Env, proto.Exec{Argv: argv, Dir: im.WorkingDir, User: im.User})
	if err != nil {
		in.log("entrypoint %q: %v", argv, err)
		return finish(proto.Exit{Code: 127})
	}
	null, err := os.Open(os.DevNull)
	if err == nil {
		defer null.Close()
		cmd.Stdin = null
	}
	cmd.Stdout, cmd.Stderr = in.console, in.console
	p, err := in.reaper.Start(cmd)
	if err != nil {
		in.log("entrypoint %q: %v", argv, err)
		return finish(proto.Exit{Code: 126})
	}
	in.mu.Lock()
	in.ep = &proto.Entrypoint{Pid: p.Pid, Running: true}
	in.mu.Unlock()
	in.mark("entrypoint")
	if in.cfg.Debug {
		in.log("entrypoint %q started as pid %d", argv, p.Pid)
	}
	shutdownAsked := false
	askedPoweroff := true
	var kill <-chan time.Time
	for {
		select {
		case sig := <-sigs:
			_ = unix.Kill(p.Pid, sig.(unix.Signal))
		case askedPoweroff = <-in.shutdown:
			if !shutdownAsked {
				shutdownAsked = true
				in.log("shutdown requested: stopping the entrypoint")
				_ = unix.Kill(p.Pid, unix.SIGTERM)
				kill = time.After(10 * time.Second)
			}
		case <-kill:
			_ = unix.Kill(p.Pid, unix.SIGKILL)
		case <-p.Done():
			st := p.Wait()
			code, poweroff := finish(proto.Exit{Code: st.Code, Signal: st.Signal})
			if shutdownAsked {
				poweroff = askedPoweroff
			}
			return code, poweroff
		}
	}
}
