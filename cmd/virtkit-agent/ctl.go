package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/virtkit/virtkit/agent/client"
)

func init() {
	register("info", "print the agent's version, boot timings and entrypoint state: info --connect URL", runInfo)
	register("shutdown", "power off (or --reboot) the guest: shutdown --connect URL", runShutdown)
	register("wait", "wait for the guest entrypoint and exit with its code: wait --connect URL", runWait)
}

func ctlFlags(name string, args []string, extra func(*flag.FlagSet)) (string, time.Duration, bool) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	connect := fs.String("connect", os.Getenv("VIRTKIT_AGENT"), "agent endpoint URL (default $VIRTKIT_AGENT)")
	timeout := fs.Duration("timeout", 0, "give up after this long (0: wait for the agent as long as it takes)")
	if extra != nil {
		extra(fs)
	}
	if err := fs.Parse(args); err != nil || *connect == "" || fs.NArg() != 0 {
		if err == nil {
			fmt.Fprintf(os.Stderr, "usage: virtkit-agent %s --connect URL\n", name)
		}
		return "", 0, false
	}
	return *connect, *timeout, true
}

func withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if d > 0 {
		return context.WithTimeout(ctx, d)
	}
	return context.WithCancel(ctx)
}

func runInfo(ctx context.Context, args []string) int {
	url, timeout, ok := ctlFlags("info", args, nil)
	if !ok {
		return 2
	}
	ctx, cancel := withTimeout(ctx, timeout)
	defer cancel()
	c, err := client.WaitReady(ctx, url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent info:", err)
		return 1
	}
	defer c.Close()
	in, err := c.Info(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent info:", err)
		return 1
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	enc.Encode(in)
	return 0
}

func runShutdown(ctx context.Context, args []string) int {
	var reboot bool
	url, timeout, ok := ctlFlags("shutdown", args, func(fs *flag.FlagSet) { fs.BoolVar(&reboot, "reboot", false, "reboot instead of powering off") })
	if !ok {
		return 2
	}
	ctx, cancel := withTimeout(ctx, timeout)
	defer cancel()
	c, err := client.Dial(ctx, url)
	if err == nil {
		err = c.Shutdown(ctx, !reboot)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent shutdown:", err)
		return 1
	}
	return 0
}

func runWait(ctx context.Context, args []string) int {
	url, timeout, ok := ctlFlags("wait", args, nil)
	if !ok {
		return 2
	}
	ctx, cancel := withTimeout(ctx, timeout)
	defer cancel()
	c, err := client.WaitReady(ctx, url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent wait:", err)
		return 255
	}
	defer c.Close()
	st, err := c.WaitEntrypoint(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent wait:", err)
		return 255
	}
	return st.Code
}
