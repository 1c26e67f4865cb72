package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/agent/client"
)

func init() {
	register(func(e *env) *cobra.Command {
		var listen, connect string
		var to int
		cmd := &cobra.Command{
			Use:   "forward --connect URL --listen tcp://127.0.0.1:8080 --to 80",
			Short: "Forward a host TCP port to a port in a VM",
			Long: "Forward a host endpoint to a TCP port in a VM, through the VM's agent (connect is the\n" +
				"agent's endpoint, e.g. hvsock:///run/vm/web1/vsock.sock:1024). Runs until interrupted.",
			Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				if connect == "" || listen == "" || to <= 0 || to > 65535 {
					return fmt.Errorf("forward: --connect, --listen and --to (1-65535) are required")
				}
				ctx := cmd.Context()
				c, err := client.Dial(ctx, connect)
				if err != nil {
					return fmt.Errorf("forward: %w", err)
				}
				defer c.Close()
				l, err := addr.Listen(listen)
				if err != nil {
					return fmt.Errorf("forward: %w", err)
				}
				e.log.Info().Str("listen", l.Addr().String()).Str("agent", connect).Int("guest_port", to).Msg("forwarding")
				return c.ForwardFrom(ctx, l, to, func(err error) { e.log.Warn().Err(err).Msg("forward failed") })
			},
		}
		f := cmd.Flags()
		f.StringVar(&connect, "connect", "", "agent endpoint URL of the VM (vsock://, hvsock://, unix://, tcp://)")
		f.StringVar(&listen, "listen", "tcp://127.0.0.1:0", "host endpoint URL to listen on")
		f.IntVar(&to, "to", 0, "TCP port in the VM")
		return cmd
	})
}
