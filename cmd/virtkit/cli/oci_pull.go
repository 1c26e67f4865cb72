package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/virtkit/virtkit/imaging/oci"
)

// imageFlags are the flags shared by oci-pull and convert.
type imageFlags struct {
	platform string
	insecure bool
	pull     string
	quiet    bool
}

func (f *imageFlags) add(fs *pflag.FlagSet) {
	fs.StringVar(&f.platform, "platform", "", "image platform os/arch[/variant] to pick from a multi-platform index (default linux/amd64)")
	fs.BoolVar(&f.insecure, "insecure", false, "allow plain-HTTP registries")
	fs.StringVar(&f.pull, "pull", oci.PullMissing, "when to ask the registry what a tag points at: always, missing or never")
	fs.BoolVarP(&f.quiet, "quiet", "q", false, "no progress output")
}

func (f *imageFlags) options(e *env) oci.Options {
	o := oci.Options{Platform: f.platform, Insecure: f.insecure, Pull: f.pull,
		CacheDir: filepath.Join(e.cfg.CacheDir, "layers"), Log: e.log}
	if !f.quiet {
		o.Progress = newProgress(os.Stderr).event
	}
	return o
}

func init() {
	register(func(e *env) *cobra.Command {
		var f imageFlags
		cmd := &cobra.Command{
			Use:   "oci-pull REF OUT.tar",
			Short: "Pull an image and write its flattened rootfs tar",
			Long: `Pull an image and write its flattened root filesystem as one tar (OUT.tar, or - for stdout).

REF is docker://REF or a bare registry reference, oci:PATH[:TAG] (an OCI image layout),
docker-archive:PATH (docker save) or tar:PATH (docker export). Layers are cached by digest under
the cache folder; whiteouts, opaque directories and hard links across layers are resolved, and no
name in the output crosses a symlink or contains "..".`,
			Args: cobra.ExactArgs(2),
			RunE: func(cmd *cobra.Command, args []string) error {
				ref, out := args[0], args[1]
				var w io.Writer = os.Stdout
				var tmp *os.File
				if out != "-" {
					var err error
					tmp, err = os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".")
					if err != nil {
						return err
					}
					defer os.Remove(tmp.Name())
					defer tmp.Close()
					w = tmp
				}
				info, err := oci.Pull(cmd.Context(), ref, w, f.options(e))
				if err != nil {
					return err
				}
				if tmp != nil {
					if err := tmp.Close(); err != nil {
						return err
					}
					if err := os.Chmod(tmp.Name(), 0o644); err != nil {
						return err
					}
					if err := os.Rename(tmp.Name(), out); err != nil {
						return err
					}
				}
				if e.output == "json" {
					return json.NewEncoder(os.Stdout).Encode(info)
				}
				if out != "-" {
					fmt.Printf("%s: %d files, %d directories, %d hard links, %s from %s\n", out, info.Files, info.Dirs, info.Links, human(info.Bytes), info.Reference)
				}
				return nil
			},
		}
		f.add(cmd.Flags())
		return cmd
	})
}

// progress shows per-layer and overall progress: redrawn bars on a terminal, one plain line per
// finished step otherwise. Its event method is safe for concurrent use.
type progress struct {
	mu     sync.Mutex
	w      *os.File
	tty    bool
	layers []layerProgress
	drawn  int
	last   time.Time
}

type layerProgress struct {
	phase        string
	bytes, total int64
}

func newProgress(w *os.File) *progress {
	return &progress{w: w, tty: term.IsTerminal(int(w.Fd()))}
}

func (p *progress) event(ev oci.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.layers) < ev.Layers {
		p.layers = append(p.layers, layerProgress{phase: "waiting", total: -1})
	}
	if ev.Phase == "done" {
		if p.tty {
			p.draw(true)
			return
		}
		for i, l := range p.layers { // the last step of each layer was not reported yet
			if l.phase != "waiting" {
				p.line(i, l)
			}
		}
		return
	}
	if ev.Layer >= len(p.layers) {
		return
	}
	l := &p.layers[ev.Layer]
	finishedPhase := l.phase != ev.Phase && l.phase != "waiting"
	if !p.tty && finishedPhase {
		p.line(ev.Layer, *l)
	}
	l.phase, l.bytes, l.total = ev.Phase, ev.Bytes, ev.Total
	if p.tty && time.Since(p.last) > 100*time.Millisecond {
		p.draw(false)
	}
}

func (p *progress) line(i int, l layerProgress) {
	s := fmt.Sprintf("layer %d/%d: %s", i+1, len(p.layers), pastTense(l.phase))
	if l.bytes > 0 {
		s += " " + human(l.bytes)
	}
	fmt.Fprintln(p.w, s)
}

func pastTense(phase string) string {
	switch phase {
	case "fetch":
		return "fetched"
	case "index":
		return "indexed"
	case "flatten":
		return "flattened"
	}
	return phase
}

func (p *progress) draw(final bool) {
	p.last = time.Now()
	if p.drawn > 0 {
		fmt.Fprintf(p.w, "\x1b[%dA", p.drawn)
	}
	var all, allTotal int64
	for i, l := range p.layers {
		all += l.bytes
		if l.total > 0 {
			allTotal += l.total
		}
		fmt.Fprintf(p.w, "\x1b[2Klayer %2d/%d %-9s %s\n", i+1, len(p.layers), l.phase, bar(l.bytes, l.total))
	}
	fmt.Fprintf(p.w, "\x1b[2Ktotal              %s\n", bar(all, allTotal))
	p.drawn = len(p.layers) + 1
	if final {
		p.drawn = 0
	}
}

func bar(n, total int64) string {
	const width = 30
	if total <= 0 {
		return fmt.Sprintf("[%s] %s", strings.Repeat(" ", width), human(n))
	}
	if n > total {
		n = total
	}
	fill := int(float64(width) * float64(n) / float64(total))
	return fmt.Sprintf("[%s%s] %s / %s", strings.Repeat("=", fill), strings.Repeat(" ", width-fill), human(n), human(total))
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
