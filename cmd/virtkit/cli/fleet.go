package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/workers/fleet"
)

func init() { register(newFleet) }

type fleetFlags struct {
	file     string
	name     string
	builder  string
	services []string
	img      imageFlags
}

// newFleet wires `virtkit fleet …` to package workers/fleet: the file model and the controller,
// which works through the daemon's broker (launcher work, event projections).
func newFleet(e *env) *cobra.Command {
	var f fleetFlags
	root := &cobra.Command{
		Use:   "fleet",
		Short: "Run a dev fleet: a builder and service microVMs on one LAN (virtkit.yaml)",
		Long: `A fleet is a set of microVM units described by a fleet file (virtkit.yaml, or -f FILE): a builder
with the project folder shared in, and services (redis, mysql, …) with persistent volumes. The units
share one LAN named after the fleet and reach each other as <unit>.lan. Units allowed to (the
virtctl: key) can start and stop others from inside with virtctl. Needs a running virtkit serve.

Without a file, --builder IMAGE and --service NAME:IMAGE describe a quick fleet.`,
	}
	// -f is the fleet file everywhere but in `logs`, where it is --follow (as in docker compose).
	fileFlags := func(cmd *cobra.Command, short string) {
		cmd.Flags().StringVarP(&f.file, "file", short, "", "fleet file (default virtkit.yaml in the working folder)")
		cmd.Flags().StringVar(&f.name, "name", "", "fleet name (default: from the file, else the folder's name)")
	}

	// connect reaches the daemon: fleet VMs must outlive this command.
	connect := func(ctx context.Context) (*broker.Client, *fleet.Controller, error) {
		c, _, err := e.connectBroker(ctx)
		if errors.Is(err, broker.ErrNoDaemon) {
			return nil, nil, fmt.Errorf("fleet: no daemon is running; start `virtkit serve` first")
		}
		if err != nil {
			return nil, nil, err
		}
		return c, fleetController(e.cfg, c, e.log, f.img.options(e)), nil
	}
	// withFleet runs fn with the fleet's name and a controller connected to the daemon.
	withFleet := func(ctx context.Context, fn func(name string, ctl *fleet.Controller) error) error {
		name, err := fleetName(e, &f)
		if err != nil {
			return err
		}
		c, ctl, err := connect(ctx)
		if err != nil {
			return err
		}
		defer c.Close()
		return fn(name, ctl)
	}
	progress := func(unit, msg string) { fmt.Fprintf(os.Stderr, "%-12s %s\n", unit, msg) }

	up := &cobra.Command{
		Use: "up", Short: "Convert images, boot the units in dependency order, wait for health; converge on re-run", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			file, src, err := loadFleet(&f)
			if err != nil {
				return &ExitError{Code: 2, Err: err}
			}
			c, ctl, err := connect(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			t0 := time.Now()
			if err := ctl.Up(cmd.Context(), file, src, progress); err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "fleet %s up in %s\n", file.Name, time.Since(t0).Round(time.Millisecond))
			return nil
		},
	}
	f.img.add(up.Flags())
	up.Flags().StringVar(&f.builder, "builder", "", "quick fleet: IMAGE of a builder unit (the working folder shared at /src, virtctl allowed)")
	up.Flags().StringArrayVar(&f.services, "service", nil, "quick fleet: NAME:IMAGE of a service unit (repeatable)")

	var purge bool
	down := &cobra.Command{
		Use: "down", Short: "Stop every unit (definition and volumes are kept; --purge removes them)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withFleet(cmd.Context(), func(name string, ctl *fleet.Controller) error {
				return ctl.Down(cmd.Context(), name, purge, progress)
			})
		},
	}
	down.Flags().BoolVar(&purge, "purge", false, "also remove the stored definition and the volumes")

	ps := &cobra.Command{
		Use: "ps", Short: "Show the units: state (event projection), IP, health", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withFleet(cmd.Context(), func(name string, ctl *fleet.Controller) error {
				st, err := ctl.Status(cmd.Context(), name)
				if err != nil {
					return err
				}
				if e.output == "json" {
					return json.NewEncoder(os.Stdout).Encode(st)
				}
				tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "UNIT\tVM\tSTATE\tHEALTH\tIP\tBOOT")
				for _, s := range st {
					boot := "-"
					if s.BootMillis > 0 && s.Phase == "running" {
						boot = fmt.Sprintf("%dms", s.BootMillis)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Unit, s.VM, s.Phase, orDash(s.Health), orDash(s.IP), boot)
				}
				return tw.Flush()
			})
		},
	}

	unitOp := func(use, short string, op func(ctx context.Context, ctl *fleet.Controller, name, unit string) error) *cobra.Command {
		return &cobra.Command{
			Use: use + " UNIT...", Short: short, Args: cobra.MinimumNArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return withFleet(cmd.Context(), func(name string, ctl *fleet.Controller) error {
					for _, u := range args {
						if err := op(cmd.Context(), ctl, name, u); err != nil {
							return err
						}
					}
					return nil
				})
			},
		}
	}
	start := unitOp("start", "Start units and wait for their health", func(ctx context.Context, ctl *fleet.Controller, name, unit string) error {
		return ctl.StartUnit(ctx, name, unit, progress)
	})
	stop := unitOp("stop", "Stop units (volumes are kept)", func(ctx context.Context, ctl *fleet.Controller, name, unit string) error {
		return ctl.StopUnit(ctx, name, unit)
	})
	restart := unitOp("restart", "Stop and start units", func(ctx context.Context, ctl *fleet.Controller, name, unit string) error {
		if err := ctl.StopUnit(ctx, name, unit); err != nil {
			return err
		}
		return ctl.StartUnit(ctx, name, unit, progress)
	})

	var ef runFlags
	attach := func(cmd *cobra.Command, unit string, req client.ExecRequest, interactive bool) error {
		name, ctl, u, err := appliedUnit(e, &f, unit)
		if err != nil {
			return err
		}
		ag, err := client.Dial(cmd.Context(), ctl.ExecURL(u.Request.Name))
		if err != nil {
			return &ExitError{Code: 125, Err: fmt.Errorf("fleet %s: unit %s: %w (is it running?)", name, unit, err)}
		}
		defer ag.Close()
		st, err := ag.Attach(cmd.Context(), req, client.Terminal{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Interactive: interactive})
		if err != nil {
			return &ExitError{Code: client.ExitCode(err), Err: err}
		}
		if st.Code != 0 {
			return &ExitError{Code: st.Code}
		}
		return nil
	}
	exec := &cobra.Command{
		Use: "exec UNIT -- CMD [ARG...]", Short: "Run a command in a unit", Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			argv := args[1:]
			if argv[0] == "--" {
				argv = argv[1:]
			}
			return attach(cmd, args[0], client.ExecRequest{Argv: argv, Env: ef.env, Dir: ef.workdir, User: ef.user, TTY: ef.tty}, ef.interactive)
		},
	}
	xf := exec.Flags()
	xf.BoolVarP(&ef.interactive, "interactive", "i", false, "stream stdin")
	xf.BoolVarP(&ef.tty, "tty", "t", false, "allocate a terminal")
	xf.StringSliceVarP(&ef.env, "env", "e", nil, "KEY=VALUE (repeatable)")
	xf.StringVarP(&ef.workdir, "workdir", "w", "", "working folder")
	xf.StringVarP(&ef.user, "user", "u", "", "user: name, uid or uid:gid")
	xf.SetInterspersed(false)

	var sshID []string
	ssh := &cobra.Command{
		Use:   "ssh [UNIT] [-- SSH-ARGS...]",
		Short: "Log in to a unit (default: builder): with ssh where the unit has ssh_keys, else a shell through the agent",
		Long: `A unit with ssh_keys runs the image's sshd with those keys authorized for root; fleet ssh runs the
host's ssh client against it, tunnelled through the agent's vsock channel (ProxyCommand
"virtkit fleet connect UNIT"), so no port needs forwarding. The private key is your ssh's own
(agent, ~/.ssh) or -i, plus the private half of every ssh_keys entry that names a .pub file.
Words after -- go to ssh (e.g. a remote command). A unit without ssh_keys gets a login shell
through the agent's exec channel instead.`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			unit := "builder"
			var extra []string
			if at := cmd.ArgsLenAtDash(); at >= 0 {
				args, extra = args[:at], args[at:]
			}
			if len(args) > 1 {
				return fmt.Errorf("fleet ssh: one unit at most (ssh arguments go after --)")
			}
			if len(args) == 1 {
				unit = args[0]
			}
			name, _, u, err := appliedUnit(e, &f, unit)
			if err != nil {
				return err
			}
			if !u.SSH {
				if len(extra) > 0 {
					return fmt.Errorf("fleet %s: unit %s has no ssh_keys: no sshd to pass ssh arguments to (use fleet exec)", name, unit)
				}
				tty := isTerminal(os.Stdin)
				return attach(cmd, unit, client.ExecRequest{Argv: []string{"/bin/sh", "-c", `exec "$(command -v bash || echo /bin/sh)" -l`}, TTY: tty}, true)
			}
			return runSSH(cmd.Context(), e, name, unit, append(sshID, u.SSHIdentities...), extra)
		},
	}
	ssh.Flags().StringArrayVarP(&sshID, "identity", "i", nil, "private key file for ssh (repeatable)")

	var connectPort int
	connectCmd := &cobra.Command{
		Use: "connect UNIT", Short: "Relay stdin/stdout to a TCP port of a unit through its agent (ssh ProxyCommand)", Args: cobra.ExactArgs(1),
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			name, ctl, u, err := appliedUnit(e, &f, args[0])
			if err != nil {
				return err
			}
			ag, err := client.Dial(cmd.Context(), ctl.ExecURL(u.Request.Name))
			if err != nil {
				return fmt.Errorf("fleet %s: unit %s: %w (is it running?)", name, args[0], err)
			}
			defer ag.Close()
			conn, err := ag.Forward(cmd.Context(), connectPort)
			if err != nil {
				return fmt.Errorf("fleet %s: unit %s port %d: %w", name, args[0], connectPort, err)
			}
			client.Splice(stdio{}, conn)
			return nil
		},
	}
	connectCmd.Flags().IntVar(&connectPort, "port", 22, "guest TCP port")

	var follow bool
	logs := &cobra.Command{
		Use: "logs UNIT", Short: "Print (-f: follow) a unit's console: its command's output, the kernel's and the agent's lines", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, _, u, err := appliedUnit(e, &f, args[0])
			if err != nil {
				return err
			}
			vmDir := filepath.Join(e.cfg.StateDir, "vms", u.Request.Name)
			console := filepath.Join(vmDir, "console.log")
			if _, err := os.Stat(console); err != nil {
				return fmt.Errorf("fleet %s: unit %s is not running on this host", name, args[0])
			}
			ctx := cmd.Context()
			gone := make(chan struct{})
			if follow {
				go func() {
					defer close(gone)
					for ctx.Err() == nil && fileExists(console) {
						time.Sleep(200 * time.Millisecond)
					}
				}()
			} else {
				close(gone)
			}
			// The unit's command is its VM's entrypoint: its output is on the console, with the
			// kernel's and the agent's lines.
			followFile(ctx, console, prefixWriter(args[0]+" | ", os.Stdout), gone)
			return nil
		},
	}
	logs.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing until the unit stops")

	for _, c := range []*cobra.Command{up, down, ps, exec, ssh, connectCmd, start, stop, restart} {
		fileFlags(c, "f")
	}
	fileFlags(logs, "")
	root.AddCommand(up, down, ps, logs, exec, ssh, connectCmd, start, stop, restart)
	return root
}

// runSSH runs the host's ssh against a unit's sshd, through `virtkit fleet connect` (the agent's
// vsock channel). Host keys are not checked: the channel is this host's own VM socket, which only
// its owner can open, and a unit's host keys change whenever its image does.
func runSSH(ctx context.Context, e *env, fleetName, unit string, ids, extra []string) error {
	sshBin, err := osexec.LookPath("ssh")
	if err != nil {
		return fmt.Errorf("fleet ssh: %w (install an ssh client, or use fleet exec)", err)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	proxy := fmt.Sprintf("%s fleet connect --name %s %s", shellQuote(self), shellQuote(fleetName), shellQuote(unit))
	args := []string{"-o", "ProxyCommand=" + proxy, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "LogLevel=ERROR", "-o", "HostKeyAlias=" + fleetName + "-" + unit}
	for _, id := range ids {
		args = append(args, "-i", id)
	}
	args = append(args, "root@"+unit)
	args = append(args, extra...)
	c := osexec.CommandContext(ctx, sshBin, args...)
	c.Stdin, c.Stdout, c.Stderr = os.Stdin, os.Stdout, os.Stderr
	c.Env = append(os.Environ(), "VIRTKIT_STATE_DIR="+e.cfg.StateDir)
	if err := c.Run(); err != nil {
		var ee *osexec.ExitError
		if errors.As(err, &ee) {
			return &ExitError{Code: ee.ExitCode()}
		}
		return fmt.Errorf("fleet ssh: %w", err)
	}
	return nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// stdio is stdin+stdout as one half-closable stream.
type stdio struct{}

func (stdio) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdio) Write(p []byte) (int, error) { return os.Stdout.Write(p) }
func (stdio) CloseWrite() error           { return os.Stdout.Close() }
func (stdio) Close() error                { os.Stdin.Close(); return os.Stdout.Close() }

// loadFleet reads the fleet file, or builds one from --builder/--service.
func loadFleet(f *fleetFlags) (*fleet.File, []byte, error) {
	if f.builder != "" || len(f.services) > 0 {
		if f.file != "" {
			return nil, nil, errors.New("fleet: give either -f FILE or --builder/--service, not both")
		}
		src, err := quickFleet(f)
		if err != nil {
			return nil, nil, err
		}
		wd, _ := os.Getwd()
		file, err := fleet.Parse(src, filepath.Join(wd, "(flags)"))
		return file, src, err
	}
	path := f.file
	if path == "" {
		path = "virtkit.yaml"
	}
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("fleet: %w", err)
	}
	abs, _ := filepath.Abs(path)
	file, err := fleet.Parse(src, abs)
	if err != nil {
		return nil, nil, err
	}
	if f.name != "" {
		file.Name = f.name
	}
	return file, src, nil
}

// quickFleet writes the fleet file the flags describe.
func quickFleet(f *fleetFlags) ([]byte, error) {
	var b strings.Builder
	if f.name != "" {
		fmt.Fprintf(&b, "name: %q\n", f.name)
	}
	b.WriteString("units:\n")
	var svc []string
	for _, s := range f.services {
		name, img, ok := strings.Cut(s, ":")
		if !ok || name == "" || img == "" {
			return nil, fmt.Errorf("--service %q: want NAME:IMAGE", s)
		}
		svc = append(svc, name)
		fmt.Fprintf(&b, "  %s:\n    image: %q\n", name, img)
	}
	if f.builder != "" {
		wd, err := os.Getwd()
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(&b, "  builder:\n    image: %q\n    mode: agent\n    virtctl: true\n    shares:\n      - host: %q\n        guest: /src\n", f.builder, wd)
		if len(svc) > 0 {
			fmt.Fprintf(&b, "    depends_on: [%s]\n", strings.Join(svc, ", "))
		}
	}
	return []byte(b.String()), nil
}

// appliedUnit loads the applied fleet the flags name and one of its units.
func appliedUnit(e *env, f *fleetFlags, unit string) (string, *fleet.Controller, *fleet.AppliedUnit, error) {
	name, err := fleetName(e, f)
	if err != nil {
		return "", nil, nil, err
	}
	ctl := fleetController(e.cfg, nil, e.log, f.img.options(e))
	a, err := ctl.Load(name)
	if err != nil {
		return "", nil, nil, err
	}
	u := a.Units[unit]
	if u == nil {
		return "", nil, nil, fmt.Errorf("fleet %s: no unit %q", name, unit)
	}
	return name, ctl, u, nil
}

// fleetName is --name, else the fleet file's name, else the only fleet applied on this host.
func fleetName(e *env, f *fleetFlags) (string, error) {
	if f.name != "" {
		return f.name, nil
	}
	path := f.file
	if path == "" && fileExists("virtkit.yaml") {
		path = "virtkit.yaml"
	}
	if path != "" {
		file, _, err := loadFleet(&fleetFlags{file: path})
		if err != nil {
			return "", err
		}
		return file.Name, nil
	}
	names := fleetController(e.cfg, nil, e.log, f.img.options(e)).List()
	if len(names) == 1 {
		return names[0], nil
	}
	return "", fmt.Errorf("fleet: which fleet? no virtkit.yaml here and %d fleets are applied (%s); use -f or --name", len(names), strings.Join(names, ", "))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// prefixWriter prefixes each line written to w.
func prefixWriter(prefix string, w *os.File) *linePrefixer {
	return &linePrefixer{prefix: prefix, w: w, bol: true}
}

type linePrefixer struct {
	prefix string
	w      *os.File
	bol    bool
}

func (p *linePrefixer) Write(b []byte) (int, error) {
	var out []byte
	for _, c := range b {
		if p.bol {
			out = append(out, p.prefix...)
		}
		out = append(out, c)
		p.bol = c == '\n'
	}
	_, err := p.w.Write(out)
	return len(b), err
}

func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
