package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/virtkit/virtkit/imaging/ext4"
)

func init() {
	register(newMkextTar)
	register(newMkext)
	register(newFingerprint)
}

// mkextFlags are the options shared by mkext-tar, mkext and fingerprint.
type mkextFlags struct {
	size, free, label, uuid string
	noJournal, sync         bool
	inject                  []string
}

func (f *mkextFlags) add(fs *pflag.FlagSet) {
	fs.StringVar(&f.size, "size", "", "image size, e.g. 8G (default: content plus --free)")
	fs.StringVar(&f.free, "free", "", "free space to leave when sizing automatically (default: 10% of the content, at least 64M)")
	fs.BoolVar(&f.noJournal, "no-journal", false, "no JBD2 journal (throwaway images)")
	fs.BoolVar(&f.sync, "sync", false, "flush the image to disk before renaming it into place")
	fs.StringVar(&f.label, "label", "", "filesystem label (up to 16 bytes)")
	fs.StringVar(&f.uuid, "uuid", "", "filesystem UUID (default: derived from the input and options)")
	fs.StringArrayVar(&f.inject, "inject", nil, "add a host file as SRC:DST[:MODE] (repeatable), e.g. dist/virtkit-agent:/sbin/virtkit-agent:0755")
}

func (f *mkextFlags) options() (ext4.Options, error) {
	o := ext4.Options{NoJournal: f.noJournal, Label: f.label, UUID: f.uuid, Sync: f.sync}
	var err error
	if f.size != "" {
		if o.Size, err = ext4.ParseSize(f.size); err != nil {
			return o, fmt.Errorf("--size: %w", err)
		}
	}
	if f.free != "" {
		if o.Free, err = ext4.ParseSize(f.free); err != nil {
			return o, fmt.Errorf("--free: %w", err)
		}
	}
	for _, s := range f.inject {
		in, err := ext4.ParseInject(s)
		if err != nil {
			return o, fmt.Errorf("--inject: %w", err)
		}
		o.Inject = append(o.Inject, in)
	}
	return o, nil
}

// openMkextInput opens a file or "-" for standard input.
func openMkextInput(name string) (io.ReadCloser, error) {
	if name == "-" {
		return io.NopCloser(os.Stdin), nil
	}
	return os.Open(name)
}

func printMkextResult(e *env, out string, res ext4.Result) error {
	if e.output == "json" {
		return json.NewEncoder(os.Stdout).Encode(map[string]any{"path": out, "uuid": res.UUID, "size": res.Size})
	}
	fmt.Printf("%s uuid=%s size=%d\n", out, res.UUID, res.Size)
	return nil
}

func newMkextTar(e *env) *cobra.Command {
	var f mkextFlags
	var printUUID bool
	cmd := &cobra.Command{
		Use:   "mkext-tar TAR|- OUT.ext4",
		Short: "Build an ext4 image from a tar stream (plain, gzip or zstd)",
		Long: `Build an ext4 image from a tar stream as an ordinary user: no mke2fs, loop device or root.
The output appears only when complete. Its UUID derives from the input bytes and options, so the
same input and options give a byte-identical image.`,
		Example: `  docker export c1 | virtkit mkext-tar - rootfs.ext4
  virtkit mkext-tar --size 8G --inject dist/virtkit-agent:/sbin/virtkit-agent:0755 rootfs.tar.zst rootfs.ext4
  virtkit mkext-tar --print-uuid rootfs.tar.gz`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := f.options()
			if err != nil {
				return err
			}
			in, err := openMkextInput(args[0])
			if err != nil {
				return err
			}
			defer in.Close()
			if printUUID {
				u, err := ext4.Fingerprint(cmd.Context(), in, opts)
				if err != nil {
					return err
				}
				fmt.Println(u)
				return nil
			}
			if len(args) != 2 {
				return fmt.Errorf("mkext-tar: want TAR|- OUT.ext4")
			}
			res, err := ext4.WriteTar(cmd.Context(), in, args[1], opts)
			if err != nil {
				return err
			}
			e.log.Debug().Str("image", args[1]).Str("uuid", res.UUID).Int64("size", res.Size).Msg("image written")
			return printMkextResult(e, args[1], res)
		},
	}
	f.add(cmd.Flags())
	cmd.Flags().BoolVar(&printUUID, "print-uuid", false, "print the UUID the image would get and write nothing")
	return cmd
}

func newMkext(e *env) *cobra.Command {
	var f mkextFlags
	cmd := &cobra.Command{
		Use:     "mkext DIR OUT.ext4",
		Short:   "Build an ext4 image from a directory",
		Example: `  virtkit mkext ./rootfs rootfs.ext4 --label root`,
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := f.options()
			if err != nil {
				return err
			}
			res, err := ext4.WriteDir(cmd.Context(), args[0], args[1], opts)
			if err != nil {
				return err
			}
			return printMkextResult(e, args[1], res)
		},
	}
	f.add(cmd.Flags())
	return cmd
}

func newFingerprint(e *env) *cobra.Command {
	var f mkextFlags
	cmd := &cobra.Command{
		Use:   "fingerprint TAR|DIR|-",
		Short: "Print the UUID mkext-tar (or mkext, for a directory) would give an input, without writing an image",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := f.options()
			if err != nil {
				return err
			}
			var u string
			if st, err := os.Stat(args[0]); err == nil && st.IsDir() {
				u, err = ext4.FingerprintDir(cmd.Context(), args[0], opts)
				if err != nil {
					return err
				}
			} else {
				in, err := openMkextInput(args[0])
				if err != nil {
					return err
				}
				defer in.Close()
				if u, err = ext4.Fingerprint(cmd.Context(), in, opts); err != nil {
					return err
				}
			}
			if e.output == "json" {
				return json.NewEncoder(os.Stdout).Encode(map[string]string{"uuid": u})
			}
			fmt.Println(u)
			return nil
		},
	}
	f.add(cmd.Flags())
	return cmd
}
