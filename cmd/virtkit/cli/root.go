// Package cli is virtkit's command tree. Commands only parse flags and wire packages together; the
// work lives in broker/, workers/, imaging/, switch/, vhostuser/ and ci/. One file per command.
package cli

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/virtkit/virtkit/cmd/virtkit/config"
	"github.com/virtkit/virtkit/vhostuser/virtiofs"
)

// Version is set at link time by build.sh (-X).
var Version = "dev"

// ExitError makes the process exit with Code (e.g. the guest command's exit code) after printing Err
// if it is not nil.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}

func (e *ExitError) Unwrap() error { return e.Err }

// env is what every command gets: the loaded config and the logger.
type env struct {
	configPath string
	logLevel   string
	stateDir   string
	output     string

	cfg *config.Config
	log zerolog.Logger
}

// load reads the configuration once flags are parsed.
func (e *env) load() error {
	if os.Getenv(virtiofs.SandboxEnv) != "" {
		// The sandboxed half of virtiofsd runs as the mapped (unprivileged) host user and gets
		// everything it needs on its command line: the host's config file is none of its business
		// and may not even be readable to it.
		e.cfg = &config.Config{LogLevel: "info"}
		lvl := zerolog.InfoLevel
		if l, err := zerolog.ParseLevel(e.logLevel); err == nil && e.logLevel != "" {
			lvl = l // the parent's --log-level, passed on
		}
		e.log = newLogger(lvl)
		return nil
	}
	cfg, err := config.Load(e.configPath)
	if err != nil {
		return err
	}
	if e.stateDir != "" {
		cfg.StateDir = e.stateDir
	}
	if e.logLevel != "" {
		cfg.LogLevel = e.logLevel
	}
	lvl, err := zerolog.ParseLevel(cfg.LogLevel)
	if err != nil {
		return fmt.Errorf("--log-level %q: %w", cfg.LogLevel, err)
	}
	e.cfg = cfg
	e.log = newLogger(lvl)
	return nil
}

// newLogger gives human console output on a TTY and JSON lines otherwise, on stderr.
func newLogger(lvl zerolog.Level) zerolog.Logger {
	var l zerolog.Logger
	if term.IsTerminal(int(os.Stderr.Fd())) {
		l = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: "15:04:05.000"})
	} else {
		l = zerolog.New(os.Stderr)
	}
	return l.Level(lvl).With().Timestamp().Logger()
}

// command is how each file registers its subcommand.
type command func(*env) *cobra.Command

var commands []command

func register(c command) { commands = append(commands, c) }

// NewRoot builds the whole command tree.
func NewRoot() *cobra.Command {
	e := &env{}
	root := &cobra.Command{
		Use:           "virtkit",
		Short:         "Boot OCI images as microVMs on a userspace LAN, driven over vsock",
		Version:       Version,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if cmd.Name() == "completion" || cmd.Name() == "help" || cmd.Name() == cobra.ShellCompRequestCmd {
				return nil
			}
			return e.load()
		},
	}
	pf := root.PersistentFlags()
	pf.StringVar(&e.configPath, "config", "", "config file (default $VIRTKIT_CONFIG, $XDG_CONFIG_HOME/virtkit/config.toml, /etc/virtkit/config.toml)")
	pf.StringVar(&e.logLevel, "log-level", "", "trace, debug, info, warn or error (default from config: info)")
	pf.StringVar(&e.stateDir, "state-dir", "", "state folder (default $XDG_STATE_HOME/virtkit)")
	pf.StringVarP(&e.output, "output", "o", "text", "output format: text or json")
	for _, c := range commands {
		root.AddCommand(c(e))
	}
	return root
}

// Execute runs the command line and returns the process exit code.
func Execute(ctx context.Context, args []string) int {
	root := NewRoot()
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		if ee.Err != nil {
			fmt.Fprintln(os.Stderr, "virtkit:", ee.Err)
		}
		return ee.Code
	}
	fmt.Fprintln(os.Stderr, "virtkit:", err)
	return 1
}
