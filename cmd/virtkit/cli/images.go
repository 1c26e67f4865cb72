package cli

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/imaging/store"
)

func init() {
	register(func(e *env) *cobra.Command {
		open := func() (*store.Store, error) { return store.Open(filepath.Join(e.cfg.StateDir, "images")) }
		list := func(bs []*store.Bundle) error {
			if e.output == "json" {
				if bs == nil {
					bs = []*store.Bundle{}
				}
				return json.NewEncoder(os.Stdout).Encode(bs)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "FINGERPRINT\tSIZE\tUSED\tPLATFORM\tSOURCE")
			for _, b := range bs {
				fmt.Fprintf(tw, "%.12s\t%s\t%s\t%s\t%s\n", b.Fingerprint, human(b.Size), ago(b.Used), b.Image.Platform, b.Image.Source)
			}
			return tw.Flush()
		}
		cmd := &cobra.Command{
			Use:   "images",
			Short: "List converted image bundles",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				st, err := open()
				if err != nil {
					return err
				}
				bs, err := st.List()
				if err != nil {
					return err
				}
				return list(bs)
			},
		}
		var keep int
		prune := &cobra.Command{
			Use:   "prune",
			Short: "Remove all but the --keep most recently used bundles",
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				st, err := open()
				if err != nil {
					return err
				}
				removed, err := st.Prune(cmd.Context(), keep)
				if err != nil {
					return err
				}
				if e.output != "json" {
					fmt.Fprintf(os.Stderr, "removed %d bundle(s)\n", len(removed))
				}
				return list(removed)
			},
		}
		prune.Flags().IntVar(&keep, "keep", 0, "bundles to keep (the most recently used)")
		rm := &cobra.Command{
			Use:   "rm FINGERPRINT...",
			Short: "Remove bundles",
			Args:  cobra.MinimumNArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				st, err := open()
				if err != nil {
					return err
				}
				all, err := st.List()
				if err != nil {
					return err
				}
				for _, a := range args {
					fp, err := resolveFingerprint(all, a)
					if err != nil {
						return err
					}
					if err := st.Remove(cmd.Context(), fp); err != nil {
						return err
					}
				}
				return nil
			},
		}
		cmd.AddCommand(prune, rm)
		return cmd
	})
}

// resolveFingerprint expands a unique prefix, as shown by `virtkit images`.
func resolveFingerprint(all []*store.Bundle, prefix string) (string, error) {
	var found []string
	for _, b := range all {
		if len(prefix) <= len(b.Fingerprint) && b.Fingerprint[:len(prefix)] == prefix {
			found = append(found, b.Fingerprint)
		}
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("no bundle %q", prefix)
	case 1:
		return found[0], nil
	}
	return "", fmt.Errorf("%q names %d bundles: give more of the fingerprint", prefix, len(found))
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t).Round(time.Second)
	switch {
	case d < time.Minute:
		return "just now"
	case d < time.Hour:
		return fmt.Sprintf("%d min ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%d h ago", int(d.Hours()))
	}
	return fmt.Sprintf("%d days ago", int(d.Hours()/24))
}
