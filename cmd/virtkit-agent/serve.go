package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"strings"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/agent/execserver"
)

func init() {
	register("serve", "run the exec server (guest side)", runServe)
}

// listFlag is a repeatable / comma-separated string flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

// repeatFlag is a repeatable string flag whose values may contain commas.
type repeatFlag []string

func (l *repeatFlag) String() string     { return strings.Join(*l, " ") }
func (l *repeatFlag) Set(v string) error { *l = append(*l, v); return nil }

func runServe(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", fmt.Sprintf("vsock://any:%d", addr.PortExec), "endpoint URL to listen on")
	var allow listFlag
	fs.Var(&allow, "allow", "allow-list: programs (absolute paths) sessions may run; repeatable or comma-separated")
	wrapper := fs.String("wrapper", "", "program (and arguments, space-separated) every session runs through")
	debug := fs.Bool("debug", false, "log every session's start and end")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	logger := log.New(os.Stderr, "virtkit-agent serve: ", log.LstdFlags|log.Lmicroseconds)
	l, err := addr.Listen(*listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent serve:", err)
		return 1
	}
	cfg := execserver.Config{
		Log:      logger,
		Debug:    *debug,
		Software: "virtkit-agent " + Version,
		Version:  Version,
		Env:      os.Environ(),
		Allow:    allow,
		Wrapper:  strings.Fields(*wrapper),
	}
	logger.Printf("serving on %s", *listen)
	if err := execserver.New(cfg).Serve(ctx, l); err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent serve:", err)
		return 1
	}
	return 0
}
