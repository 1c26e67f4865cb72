package cli

import (
	"context"
	"encoding/json"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/ci/gitlab"
)

func init() { register(newGitLab) }

// newGitLab wires GitLab Runner's custom executor stages (deploy/gitlab-runner.toml) to ci/gitlab.
func newGitLab(e *env) *cobra.Command {
	root := &cobra.Command{
		Use:   "gitlab",
		Short: "GitLab Runner custom executor: one throwaway microVM per job, pooled across hosts",
		Long: `The hooks GitLab Runner's custom executor calls (see deploy/gitlab-runner.toml):

  virtkit gitlab config            print the executor's JSON (builds/cache dirs, driver, shell)
  virtkit gitlab prepare           queue the job on the pool (vk.work.ci.job) and wait for its VM
  virtkit gitlab run SCRIPT STAGE  run a stage script in the job VM, output streamed live
  virtkit gitlab cleanup           tear the job's VMs down (never changes the job's result)

A failing script exits with $BUILD_FAILURE_EXIT_CODE, an infrastructure fault with
$SYSTEM_FAILURE_EXIT_CODE (GitLab retries those). The pool is the NATS cluster of nats.url, or
the local virtkit serve.`,
	}
	hooks := func() (*gitlab.Hooks, error) {
		env, err := gitlab.LoadEnv(os.Environ())
		if err != nil {
			if env == nil {
				return nil, &ExitError{Code: 2, Err: err}
			}
			return nil, &ExitError{Code: env.SystemFailure, Err: err}
		}
		return &gitlab.Hooks{
			Env: env,
			Connect: func(ctx context.Context) (*broker.Client, error) {
				c, _, err := e.connectBroker(ctx)
				return c, err
			},
			StateDir:     e.cfg.StateDir,
			DefaultImage: e.cfg.CI.DefaultImage,
			Stdout:       os.Stdout,
			Stderr:       os.Stderr,
			Log:          e.log,
		}, nil
	}
	code := func(n int) error {
		if n == 0 {
			return nil
		}
		return &ExitError{Code: n}
	}
	root.AddCommand(&cobra.Command{
		Use: "config", Short: "Print the custom executor's configuration JSON", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			host, _ := os.Hostname()
			return json.NewEncoder(os.Stdout).Encode(gitlab.NewDriverConfig(Version, host))
		},
	}, &cobra.Command{
		Use: "prepare", Short: "Queue the job and wait until a host has booted its microVM", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			h, err := hooks()
			if err != nil {
				return err
			}
			return code(h.Prepare(cmd.Context()))
		},
	}, &cobra.Command{
		Use: "run SCRIPT STAGE", Short: "Run a stage script in the job's microVM", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			h, err := hooks()
			if err != nil {
				return err
			}
			// SIGTERM/SIGINT are GitLab's graceful kill: forward them instead of ending here.
			sigs := make(chan os.Signal, 4)
			signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
			defer signal.Stop(sigs)
			return code(h.Run(context.WithoutCancel(cmd.Context()), args[0], args[1], sigs))
		},
	}, &cobra.Command{
		Use: "cleanup", Short: "Tear the job's microVMs down", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			h, err := hooks()
			if err != nil {
				return err
			}
			return code(h.Cleanup(context.WithoutCancel(cmd.Context())))
		},
	})
	return root
}
