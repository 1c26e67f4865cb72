package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/virtkit/virtkit/agent/virtctl"
)

func init() {
	runVirtctl = virtctlMain
	register("virtctl", "fleet control from inside a fleet VM (also runs when invoked as virtctl)", func(ctx context.Context, args []string) int {
		return virtctlMain(args)
	})
}

// virtctlMain is `virtctl start|stop|restart|status|ls [UNIT]`: it asks the host's fleet control
// server, which refuses VMs whose unit has no virtctl permission for the target.
func virtctlMain(args []string) int {
	fs := flag.NewFlagSet("virtctl", flag.ContinueOnError)
	endpoint := fs.String("endpoint", virtctl.Endpoint, "host fleet control endpoint")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up after this long (start waits for the unit's health check)")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: virtctl [flags] start|stop|restart UNIT\n       virtctl [flags] status [UNIT]\n       virtctl [flags] ls")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() < 1 || fs.NArg() > 2 {
		fs.Usage()
		return 2
	}
	req := virtctl.Request{Op: fs.Arg(0), Unit: fs.Arg(1)}
	if err := req.Validate(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	resp, err := virtctl.Do(ctx, *endpoint, req)
	var refused *virtctl.Refused
	if errors.As(err, &refused) {
		fmt.Fprintf(os.Stderr, "virtctl: %s\n", refused.Msg)
		return 1
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if resp.Message != "" {
		fmt.Println(resp.Message)
	}
	if req.Op == virtctl.OpStatus || req.Op == virtctl.OpLs {
		tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "UNIT\tSTATE\tHEALTH\tIP\tCONTROL")
		for _, u := range resp.Units {
			ctl := "-"
			if u.Control {
				ctl = "yes"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", u.Unit, u.Phase, dash(u.Health), dash(u.IP), ctl)
		}
		tw.Flush()
		if req.Unit != "" && len(resp.Units) == 1 && resp.Units[0].Phase != "running" {
			return 3 // like systemctl status: not running
		}
	}
	return 0
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
