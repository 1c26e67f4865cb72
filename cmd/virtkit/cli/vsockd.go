package cli

import (
	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/vhostuser/vsock"
)

func init() {
	register(func(e *env) *cobra.Command {
		var cfg vsock.Config
		var bufKiB uint32
		cmd := &cobra.Command{
			Use:   "vsockd --socket PATH --uds PATH --cid N",
			Short: "Serve a vhost-user vsock device that speaks Cloud Hypervisor's hybrid vsock on a unix socket",
			Long: `vsockd is a vhost-user-vsock backend for QEMU. QEMU connects to --socket
(-chardev socket,id=vsock0,path=SOCKET -device vhost-user-vsock-device,chardev=vsock0 on microvm,
vhost-user-vsock-pci on q35; guest memory must be shared: memory-backend-memfd,share=on).
The host then talks to the guest exactly as with Cloud Hypervisor's --vsock socket=UDS:
connect to UDS and send "CONNECT <port>\n" (answer "OK <n>\n"), and guest connections to CID 2
port P arrive at the unix socket UDS_P.`,
			Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				cfg.Logger = e.log
				cfg.BufAlloc = bufKiB << 10
				b, err := vsock.Serve(cmd.Context(), cfg)
				if err != nil {
					return err
				}
				e.log.Info().Str("socket", cfg.Socket).Str("uds", cfg.UDS).Uint64("cid", cfg.CID).Msg("vsockd serving")
				return b.Wait()
			},
		}
		f := cmd.Flags()
		f.StringVar(&cfg.Socket, "socket", "", "vhost-user socket to listen on (the VMM connects to it)")
		f.StringVar(&cfg.UDS, "uds", "", "hybrid vsock unix socket for the host side")
		f.Uint64Var(&cfg.CID, "cid", 3, "guest context ID")
		f.Uint32Var(&bufKiB, "buf-kib", 256, "receive buffer per connection granted to the guest, in KiB")
		f.IntVar(&cfg.MaxConns, "max-conns", 1023, "maximum concurrent connections")
		cmd.MarkFlagRequired("socket")
		cmd.MarkFlagRequired("uds")
		return cmd
	})
}
