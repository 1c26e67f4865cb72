package initproc

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/agent/reaper"
)

// handOff writes runtime units for the exec server (and network relay) and replaces PID 1 with
// systemd. It only returns if systemd could not be started; the init then stays in agent mode.
func (in *Init) handOff() {
	if err := in.writeUnits(); err != nil {
		in.log("systemd mode: %v; staying in agent mode", err)
	} else {
		in.log("handing PID 1 to %s (%s)", in.cfg.Systemd, in.timings())
		in.reaper.Close()
		err = unix.Exec(in.cfg.Systemd, []string{in.cfg.Systemd}, os.Environ())
		in.log("systemd mode: exec %s: %v; staying in agent mode", in.cfg.Systemd, err)
		in.reaper = reaper.New(true)
	}
	in.cfg.Mode = ModeAgent
}

func (in *Init) writeUnits() error {
	if _, err := os.Stat(in.cfg.Systemd); err != nil {
		return fmt.Errorf("no systemd: %w", err)
	}
	dir := "/run/systemd/system"
	wants := filepath.Join(dir, "sysinit.target.wants")
	if err := os.MkdirAll(wants, 0o755); err != nil {
		return err
	}
	serve := []string{in.self, "serve", "--listen", in.cfg.Listen}
	if len(in.cfg.Allow) > 0 {
		serve = append(serve, "--allow", strings.Join(in.cfg.Allow, ","))
	}
	if len(in.cfg.Wrapper) > 0 {
		serve = append(serve, "--wrapper", strings.Join(in.cfg.Wrapper, " "))
	}
	if in.cfg.Debug {
		serve = append(serve, "--debug")
	}
	units := map[string]string{"virtkit-agent.service": unit("virtkit agent exec server", serve)}
	if in.cfg.Net.Mode != "none" {
		units["virtkit-net.service"] = unit("virtkit network relay", in.relayArgv())
	}
	if len(in.cfg.SSHKeys) > 0 {
		if err := os.MkdirAll("/root/.ssh", 0o700); err == nil {
			_ = os.WriteFile("/root/.ssh/authorized_keys", []byte(strings.Join(in.cfg.SSHKeys, "\n")+"\n"), 0o600)
		}
	}
	for name, body := range units {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			return err
		}
		link := filepath.Join(wants, name)
		_ = os.Remove(link)
		if err := os.Symlink(filepath.Join(dir, name), link); err != nil {
			return err
		}
	}
	return nil
}

func unit(desc string, argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = "\"" + strings.ReplaceAll(a, "\"", "\\\"") + "\""
	}
	return fmt.Sprintf(`[Unit]
Description=%s
DefaultDependencies=no
Before=sysinit.target shutdown.target
Conflicts=shutdown.target

[Service]
ExecStart=%s
Restart=always
RestartSec=1

[Install]
WantedBy=sysinit.target
`, desc, strings.Join(q, " "))
}
