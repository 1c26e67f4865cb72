package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/broker"
)

func init() { register(newVM) }

// newVM manages VMs that a daemon runs: ls from the event projection; exec, logs and console work
// on this host's VM folders; stop and rm go through the broker to the host that runs the VM.
func newVM(e *env) *cobra.Command {
	vm := &cobra.Command{Use: "vm", Short: "List, exec into, follow, stop and remove VMs"}
	vmDir := func(name string) string { return filepath.Join(e.cfg.StateDir, "vms", name) }
	execURL := func(name string) string {
		return fmt.Sprintf("hvsock://%s:%d", filepath.Join(vmDir(name), "vsock.sock"), addr.PortExec)
	}

	ls := &cobra.Command{
		Use: "ls", Short: "List VMs (from the event log's projection)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := e.connectBroker(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			st, err := broker.ReadProjection(cmd.Context(), c)
			if err != nil {
				return err
			}
			all, _ := cmd.Flags().GetBool("all")
			var rows []*broker.VM
			for _, v := range st.VMs {
				if all || v.Phase == "starting" || v.Phase == "ready" {
					rows = append(rows, v)
				}
			}
			sort.Slice(rows, func(i, j int) bool { return rows[i].ID < rows[j].ID })
			if e.output == "json" {
				return json.NewEncoder(os.Stdout).Encode(rows)
			}
			tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tPHASE\tHOST\tIP\tCPUS\tMEMORY\tBOOT")
			for _, v := range rows {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%dM\t%dms\n", v.ID, v.Phase, v.Host, v.IP, v.CPUs, v.MemoryMiB, v.BootMillis)
			}
			return tw.Flush()
		},
	}
	ls.Flags().BoolP("all", "a", false, "include stopped and failed VMs")

	var ef runFlags
	exec := &cobra.Command{
		Use: "exec NAME -- CMD [ARG...]", Short: "Run a command in a VM on this host", Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client.Dial(cmd.Context(), execURL(args[0]))
			if err != nil {
				return &ExitError{Code: 125, Err: err}
			}
			defer c.Close()
			argv := args[1:]
			if argv[0] == "--" {
				argv = argv[1:]
			}
			req := client.ExecRequest{Argv: argv, Env: ef.env, Dir: ef.workdir, User: ef.user, TTY: ef.tty}
			st, err := c.Attach(cmd.Context(), req, client.Terminal{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Interactive: ef.interactive})
			if err != nil {
				return &ExitError{Code: client.ExitCode(err), Err: err}
			}
			if st.Code != 0 {
				return &ExitError{Code: st.Code}
			}
			return nil
		},
	}
	ef2 := exec.Flags()
	ef2.BoolVarP(&ef.interactive, "interactive", "i", false, "stream stdin")
	ef2.BoolVarP(&ef.tty, "tty", "t", false, "allocate a terminal")
	ef2.StringSliceVarP(&ef.env, "env", "e", nil, "KEY=VALUE (repeatable)")
	ef2.StringVarP(&ef.workdir, "workdir", "w", "", "working folder")
	ef2.StringVarP(&ef.user, "user", "u", "", "user: name, uid or uid:gid")
	ef2.SetInterspersed(false)

	logs := &cobra.Command{
		Use: "logs NAME", Aliases: []string{"console"}, Short: "Print (-f: follow) a VM's console", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p := filepath.Join(vmDir(args[0]), "console.log")
			if _, err := os.Stat(p); err != nil {
				return fmt.Errorf("vm %s: no console on this host: %w", args[0], err)
			}
			follow, _ := cmd.Flags().GetBool("follow")
			if !follow {
				b, err := os.ReadFile(p)
				os.Stdout.Write(b)
				return err
			}
			gone := make(chan struct{})
			go func() {
				for {
					if _, err := os.Stat(p); err != nil {
						close(gone)
						return
					}
					time.Sleep(200 * time.Millisecond)
				}
			}()
			followFile(cmd.Context(), p, os.Stdout, gone)
			return nil
		},
	}
	logs.Flags().BoolP("follow", "f", false, "keep printing as the console grows")

	stopCmd := func(use, short string, kill bool) *cobra.Command {
		return &cobra.Command{
			Use: use + " NAME...", Short: short, Args: cobra.MinimumNArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, _, err := e.connectBroker(cmd.Context())
				if err != nil {
					return err
				}
				defer c.Close()
				st, err := broker.ReadProjection(cmd.Context(), c)
				if err != nil {
					return err
				}
				for _, name := range args {
					host := c.Host()
					if v, ok := st.VMs[name]; ok && v.Host != "" {
						host = v.Host
					}
					ctx, cancel := context.WithTimeout(cmd.Context(), 60*time.Second)
					s, err := stopVM(ctx, c, host, name, kill)
					cancel()
					if err != nil {
						return err
					}
					fmt.Printf("%s: %s\n", name, s.Reason)
				}
				return nil
			},
		}
	}
	vm.AddCommand(ls, exec, logs, stopCmd("stop", "Power VMs off (orderly, then forced)", false), stopCmd("rm", "Kill VMs and remove their state", true))
	return vm
}
