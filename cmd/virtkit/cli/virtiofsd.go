package cli

import (
	"github.com/rs/zerolog"

	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/vhostuser/virtiofs"
)

func init() {
	register(func(e *env) *cobra.Command {
		var cfg virtiofs.Config
		var sandbox string
		var uidMaps, gidMaps []string
		cmd := &cobra.Command{
			Use:   "virtiofsd --socket-path PATH --shared-dir DIR",
			Short: "Serve a directory over vhost-user virtio-fs",
			Long: `virtiofsd serves --shared-dir to one VM over vhost-user virtio-fs.
Cloud Hypervisor: --fs tag=TAG,socket=PATH with --memory ...,shared=on.
QEMU: -chardev socket,id=fs0,path=PATH -device vhost-user-fs-device,chardev=fs0,tag=TAG (microvm)
or vhost-user-fs-pci (q35), with -object memory-backend-memfd,id=mem,size=...,share=on.

With --sandbox namespace (the default) the daemon re-executes itself in a new mount namespace
(and user namespace when not root), pivots its root into the share and detaches the host's file
system, so the guest cannot name anything outside the share. --sandbox none serves from the
host's namespace and trusts the guest.`,
			Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				cfg.Logger = e.log
				cfg.Trace = e.log.GetLevel() <= zerolog.TraceLevel // --log-level trace: every FUSE request
				ctx := cmd.Context()
				if share := os.Getenv(virtiofs.SandboxEnv); share != "" { // the sandboxed child
					if err := virtiofs.EnterSandbox(share, cfg.ReadOnly); err != nil {
						return err
					}
					l, err := virtiofs.InheritedListener()
					if err != nil {
						return err
					}
					cfg.Listener, cfg.SharedDir = l, "/"
					s, err := virtiofs.Serve(ctx, cfg)
					if err != nil {
						return err
					}
					e.log.Info().Str("share", share).Msg("virtiofsd serving (sandboxed)")
					return s.Wait()
				}
				dir, err := filepath.Abs(cfg.SharedDir)
				if err != nil {
					return err
				}
				if dir, err = filepath.EvalSymlinks(dir); err != nil {
					return fmt.Errorf("--shared-dir: %w", err)
				}
				cfg.SharedDir = dir
				switch sandbox {
				case "namespace":
					var um, gm []virtiofs.IDMap
					for _, s := range uidMaps {
						m, err := virtiofs.ParseIDMap(s)
						if err != nil {
							return fmt.Errorf("--uid-map: %w", err)
						}
						um = append(um, m)
					}
					for _, s := range gidMaps {
						m, err := virtiofs.ParseIDMap(s)
						if err != nil {
							return fmt.Errorf("--gid-map: %w", err)
						}
						gm = append(gm, m)
					}
					l, err := virtiofs.Listen(cfg.Socket)
					if err != nil {
						return err
					}
					defer os.Remove(cfg.Socket)
					defer l.Close()
					e.log.Info().Str("socket", cfg.Socket).Str("share", dir).Msg("virtiofsd starting sandboxed")
					return virtiofs.SpawnSandboxed(ctx, dir, l, os.Args, um, gm)
				case "none":
					if len(uidMaps)+len(gidMaps) > 0 {
						return fmt.Errorf("--uid-map/--gid-map need --sandbox namespace")
					}
					e.log.Warn().Msg("virtiofsd: --sandbox none: the guest is trusted not to race path lookups out of the share")
					s, err := virtiofs.Serve(ctx, cfg)
					if err != nil {
						return err
					}
					return s.Wait()
				}
				return fmt.Errorf("--sandbox %q: want namespace or none", sandbox)
			},
		}
		f := cmd.Flags()
		f.StringVar(&cfg.Socket, "socket-path", "", "vhost-user socket to listen on")
		f.StringVar(&cfg.SharedDir, "shared-dir", "", "directory to share")
		f.BoolVar(&cfg.ReadOnly, "readonly", false, "share read-only")
		f.StringVar(&cfg.Cache, "cache", "auto", "cache policy: auto, always or never")
		f.BoolVar(&cfg.Xattr, "xattr", false, "enable extended attributes")
		f.IntVar(&cfg.RequestQueues, "queues", 1, "request queues (the VMM must configure as many)")
		f.StringArrayVar(&uidMaps, "uid-map", nil, "user namespace uid mapping inside:outside:count (repeatable)")
		f.StringArrayVar(&gidMaps, "gid-map", nil, "user namespace gid mapping inside:outside:count (repeatable)")
		f.StringVar(&sandbox, "sandbox", "namespace", "namespace (pivot into the share) or none")
		cmd.MarkFlagRequired("socket-path")
		cmd.MarkFlagRequired("shared-dir")
		return cmd
	})
}
