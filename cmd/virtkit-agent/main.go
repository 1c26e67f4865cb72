// Command virtkit-agent is the guest half of virtkit: PID 1 (init), the exec server (serve), the
// network relay (net), and the host-side clients (exec, connect, forward, cp). Invoked as virtctl it
// is the fleet control client inside a VM.
//
// It must stay small: it uses the standard flag package, not cobra, and a guard test keeps NATS,
// gVisor, zerolog and the image code out of its imports.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"syscall"
)

// Version is set at link time by build.sh (-X).
var Version = "dev"

// subcommand runs with the arguments after its name and returns the exit code.
type subcommand struct {
	summary string
	run     func(ctx context.Context, args []string) int
}

var subcommands = map[string]subcommand{}

// register adds a subcommand; each lives in its own file and registers from init.
func register(name, summary string, run func(ctx context.Context, args []string) int) {
	subcommands[name] = subcommand{summary, run}
}

func init() {
	register("version", "print the version", func(context.Context, []string) int { fmt.Println(Version); return 0 })
}

func main() {
	if filepath.Base(os.Args[0]) == "virtctl" {
		os.Exit(runVirtctl(os.Args[1:]))
	}
	// The kernel starts init= with no arguments: as PID 1 with no subcommand, be the init. (It may
	// pass unknown "key=value" words as arguments; those are not subcommands either.)
	if os.Getpid() == 1 && (len(os.Args) < 2 || subcommands[os.Args[1]].run == nil) {
		os.Exit(runInit(context.Background(), nil))
	}
	if len(os.Args) < 2 || os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help" {
		usage()
		if len(os.Args) < 2 {
			os.Exit(2)
		}
		return
	}
	sc, ok := subcommands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "virtkit-agent: unknown command %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	code := sc.run(ctx, os.Args[2:])
	stop()
	os.Exit(code)
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: virtkit-agent COMMAND [flags]\n\ncommands:")
	names := make([]string, 0, len(subcommands))
	for n := range subcommands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-10s %s\n", n, subcommands[n].summary)
	}
}

// runVirtctl is replaced by the fleet control client (issue 8).
var runVirtctl = func(args []string) int {
	fmt.Fprintln(os.Stderr, "virtctl: fleet control is not implemented yet (issue 8)")
	return 2
}
