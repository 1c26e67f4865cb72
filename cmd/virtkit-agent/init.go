package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/virtkit/virtkit/agent/initproc"
)

func init() {
	register("init", "run as PID 1 of a guest (the kernel's init=)", runInit)
}

func runInit(_ context.Context, args []string) int {
	fs := flag.NewFlagSet("init", flag.ContinueOnError)
	var opt initproc.Options
	fs.StringVar(&opt.Cmdline, "cmdline", "", "use this instead of /proc/cmdline (virtkit.* keys)")
	fs.StringVar(&opt.ConfigFile, "config", "", "config file (default /etc/virtkit/agent.conf)")
	fs.BoolVar(&opt.NoSwitch, "no-poweroff", false, "exit instead of powering off at the end")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if os.Getpid() != 1 && !opt.NoSwitch {
		fmt.Fprintln(os.Stderr, "virtkit-agent init: not PID 1; pass --no-poweroff to run it anyway")
		return 2
	}
	opt.Version = Version
	return initproc.Run(opt)
}
