package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/broker"
)

func init() {
	register(func(e *env) *cobra.Command {
		return &cobra.Command{
			Use:   "status",
			Short: "Show broker, streams, hosts and workers",
			Long: `Show the broker this host uses (the local daemon, or nats.url), its streams and state tables
with message counts and sizes, and the live hosts with their capacity and workers.
Exit status 3 means no local daemon is running. --output json prints the same as one JSON object.`,
			Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				if e.output != "text" && e.output != "json" {
					return fmt.Errorf("--output %q: want text or json", e.output)
				}
				ctx, cancel := context.WithTimeout(cmd.Context(), 15*time.Second)
				defer cancel()
				c, ep, err := e.connectBroker(ctx)
				if err != nil {
					return err
				}
				defer c.Close()
				r, err := broker.Status(ctx, c, ep)
				if err != nil {
					return err
				}
				out := cmd.OutOrStdout()
				if e.output == "json" {
					enc := json.NewEncoder(out)
					enc.SetIndent("", "  ")
					return enc.Encode(r)
				}
				printStatus(out, r, time.Now())
				return nil
			},
		}
	})
}

func printStatus(w io.Writer, r *broker.Report, now time.Time) {
	b := r.Broker
	kind := "external"
	if b.Embedded {
		kind = fmt.Sprintf("embedded, pid %d, up %s", b.PID, now.Sub(b.Started).Round(time.Second))
	}
	fmt.Fprintf(w, "broker   %s (%s)\n", b.URL, kind)
	cluster := ""
	if b.Cluster != "" {
		cluster = ", cluster " + b.Cluster
	}
	fmt.Fprintf(w, "server   %s, nats-server %s%s, rtt %s\n", b.Server, b.Version, cluster, time.Duration(b.RTT).Round(time.Microsecond))
	fmt.Fprintf(w, "storage  %s on disk, %s in memory, %d consumers\n\n", bytes(b.Storage), bytes(b.Memory), b.Consumers)

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "STREAM\tMESSAGES\tBYTES\tCONSUMERS\tLAST")
	for _, s := range append(append([]broker.StreamStatus(nil), r.Streams...), r.Buckets...) {
		last := "-"
		if !s.LastTime.IsZero() && s.LastSeq > 0 {
			last = now.Sub(s.LastTime).Round(time.Second).String() + " ago"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\n", s.Name, s.Messages, bytes(s.Bytes), s.Consumers, last)
	}
	tw.Flush()

	fmt.Fprintln(w)
	if len(r.Hosts) == 0 {
		fmt.Fprintln(w, "no live hosts")
	} else {
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "HOST\tVERSION\tRUNNING\tCAPACITY\tSEEN\tUP\tWORKERS")
		for _, h := range r.Hosts {
			var ws []string
			for _, wk := range h.Workers {
				s := wk.Name + ":" + wk.State
				if wk.Restarts > 0 {
					s += fmt.Sprintf("(%d restarts)", wk.Restarts)
				}
				ws = append(ws, s)
			}
			seen, up := now.Sub(h.LastSeen).Round(time.Second).String()+" ago", now.Sub(h.Started).Round(time.Second).String()
			if h.Stopped {
				seen, up, ws = "stopped "+seen, "-", nil
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%s\n", h.ID, h.Version, h.Running, h.Capacity, seen, up, strings.Join(ws, " "))
		}
		tw.Flush()
	}
	for _, p := range r.Projectors {
		fmt.Fprintf(w, "projector %s: applied up to event %d, %d behind\n", p.Host, p.Applied, p.Lag)
	}
	for _, p := range r.Problems {
		fmt.Fprintln(w, "problem:", p)
	}
}

func bytes(n uint64) string {
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
