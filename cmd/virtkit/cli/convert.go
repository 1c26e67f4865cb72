package cli

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/imaging/oci"
)

func init() {
	register(func(e *env) *cobra.Command {
		var (
			f          imageFlags
			agent      string
			size, free string
			noJournal  bool
		)
		cmd := &cobra.Command{
			Use:   "convert REF",
			Short: "Convert an OCI/Docker image into a bootable bundle",
			Long: `Convert an image into a bundle in the store (<state>/images/<fingerprint>/): rootfs.ext4 with
the guest agent at /sbin/virtkit-agent and the image config at /.virtkit/image.json, and image.json
beside it. Prints the bundle folder (the record with --output json).

REF is docker://REF or a bare registry reference, oci:PATH[:TAG], docker-archive:PATH or tar:PATH.
Converting the same image with the same options again is a cache hit: no layer is read, and no
network is used for a digest reference or a tag the --pull policy lets this host trust.`,
			Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				o := oci.ConvertOptions{Options: f.options(e), Store: filepath.Join(e.cfg.StateDir, "images"), Agent: agent, NoJournal: noJournal}
				var err error
				if o.Size, err = parseSize(size); err != nil {
					return fmt.Errorf("--size: %w", err)
				}
				if o.Free, err = parseSize(free); err != nil {
					return fmt.Errorf("--free: %w", err)
				}
				if o.Agent == "" {
					if o.Agent, err = oci.FindAgent(); err != nil {
						return err
					}
				}
				b, built, err := oci.ConvertStatus(cmd.Context(), args[0], o)
				if err != nil {
					return err
				}
				e.log.Debug().Str("image", args[0]).Str("bundle", b.Fingerprint).Bool("built", built).Msg("convert")
				if e.output == "json" {
					return json.NewEncoder(os.Stdout).Encode(b)
				}
				fmt.Println(b.Dir)
				return nil
			},
		}
		f.add(cmd.Flags())
		cmd.Flags().StringVar(&agent, "agent", "", "virtkit-agent binary to inject (default: next to virtkit, else on $PATH)")
		cmd.Flags().StringVar(&size, "size", "", "ext4 image size, e.g. 4G (default: the content plus --free)")
		cmd.Flags().StringVar(&free, "free", "", "free space to leave with an automatic size, e.g. 256M")
		cmd.Flags().BoolVar(&noJournal, "no-journal", false, "leave out the ext4 journal")
		return cmd
	})
}

// parseSize reads a byte count with an optional binary suffix: 512, 64K, 256M, 4G, 1T.
func parseSize(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	mult := int64(1)
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(s), "B"), "I")
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult, t = 1<<10, t[:n-1]
		case 'M':
			mult, t = 1<<20, t[:n-1]
		case 'G':
			mult, t = 1<<30, t[:n-1]
		case 'T':
			mult, t = 1<<40, t[:n-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q: want a byte count like 512, 64K, 256M or 4G", s)
	}
	return n * mult, nil
}
