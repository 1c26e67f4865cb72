package initproc

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/agent/reaper"
)

// service is a supervised child: restarted with back-off when it exits, until stopped.
type service struct {
	name string
	argv []string
	env  []string

	mu   sync.Mutex
	proc *reaper.Proc
}

// supervise runs s until ctx ends, then sends SIGTERM (SIGKILL after grace) and returns.
func (in *Init) supervise(ctx context.Context, wg *sync.WaitGroup, s *service) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer func() {
			if r := recover(); r != nil {
				in.log("PANIC supervising %s: %v", s.name, r)
			}
		}()
		backoff := 250 * time.Millisecond
		for ctx.Err() == nil {
			cmd := exec.Command(s.argv[0], s.argv[1:]...)
			cmd.Env = s.env
			cmd.Stdout, cmd.Stderr = in.console, in.console
			cmd.SysProcAttr = &unix.SysProcAttr{Setsid: true}
			started := time.Now()
			p, err := in.reaper.Start(cmd)
			if err != nil {
				in.log("%s: start: %v", s.name, err)
			} else {
				s.mu.Lock()
				s.proc = p
				s.mu.Unlock()
				select {
				case <-p.Done():
					in.log("%s exited: %s", s.name, p.Wait())
				case <-ctx.Done():
					_ = unix.Kill(p.Pid, unix.SIGTERM)
					select {
					case <-p.Done():
					case <-time.After(3 * time.Second):
						_ = unix.Kill(p.Pid, unix.SIGKILL)
						<-p.Done()
					}
					return
				}
			}
			if time.Since(started) > 30*time.Second {
				backoff = 250 * time.Millisecond
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 30*time.Second)
		}
	}()
}

// NetReadyFile is written by the network relay (JSON: ip, router, dns) once the interface has
// its address, so a host can wait for the guest's network and not only for the agent.
const NetReadyFile = "/run/virtkit/net.json"

// relayArgv is the network relay command (agent/netrelay, the "net" subcommand).
func (in *Init) relayArgv() []string {
	argv := []string{in.self, "net", "--connect", in.cfg.Relay, "--tap", in.cfg.Tap}
	if in.cfg.NIC != "" {
		argv = []string{in.self, "net", "--nic", in.cfg.NIC}
	}
	argv = append(argv, "--ready-file", NetReadyFile)
	n := in.cfg.Net
	switch n.Mode {
	case "static":
		argv = append(argv, "--mode", "static", "--ip", n.Address.String())
		if n.Gateway.IsValid() {
			argv = append(argv, "--gateway", n.Gateway.String())
		}
	default:
		argv = append(argv, "--mode", "dhcp")
	}
	if len(in.cfg.DNS) > 0 {
		var s []string
		for _, a := range in.cfg.DNS {
			s = append(s, a.String())
		}
		argv = append(argv, "--dns", strings.Join(s, ","))
	}
	if h, err := os.Hostname(); err == nil {
		argv = append(argv, "--hostname", h)
	}
	return argv
}

// prepareSSH installs the authorized keys and host keys; it returns sshd's argv, or nil when the
// image has no sshd.
func (in *Init) prepareSSH() []string {
	sshd := findProgram("sshd")
	if sshd == "" {
		in.log("ssh keys given but the image has no sshd")
		return nil
	}
	if err := os.MkdirAll("/root/.ssh", 0o700); err != nil {
		in.log("ssh: %v", err)
		return nil
	}
	if err := os.WriteFile("/root/.ssh/authorized_keys", []byte(strings.Join(in.cfg.SSHKeys, "\n")+"\n"), 0o600); err != nil {
		in.log("ssh: %v", err)
		return nil
	}
	_ = os.MkdirAll("/run/sshd", 0o755)
	if keys, _ := filepath.Glob("/etc/ssh/ssh_host_*_key"); len(keys) == 0 {
		if kg := findProgram("ssh-keygen"); kg != "" {
			cmd := exec.Command(kg, "-A")
			cmd.Stdout, cmd.Stderr = in.console, in.console
			if p, err := in.reaper.Start(cmd); err == nil {
				p.Wait()
			}
		}
	}
	return []string{sshd, "-D", "-e"}
}

// findProgram looks in the standard folders: the kernel starts init with no PATH.
func findProgram(name string) string {
	for _, dir := range []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	return ""
}
