package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/agent/client"
)

func init() {
	register("forward", "forward a host port into the guest: forward --listen tcp://127.0.0.1:8080 --connect URL --to 80", runForward)
	register("connect", "SSH ProxyCommand: connect [--port 22 | --direct] URL relays stdin/stdout to a guest port", runConnect)
}

func runForward(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("forward", flag.ContinueOnError)
	listen := fs.String("listen", "", "endpoint URL to listen on, e.g. tcp://127.0.0.1:8080")
	connect := fs.String("connect", os.Getenv("VIRTKIT_AGENT"), "agent endpoint URL (default $VIRTKIT_AGENT)")
	to := fs.Int("to", 0, "guest TCP port")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *listen == "" || *connect == "" || *to <= 0 || *to > 65535 {
		fmt.Fprintln(os.Stderr, "usage: virtkit-agent forward --listen URL --connect URL --to PORT")
		return 2
	}
	c, err := client.Dial(ctx, *connect)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent forward:", err)
		return 1
	}
	defer c.Close()
	l, err := addr.Listen(*listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent forward:", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "virtkit-agent forward: %s → guest port %d\n", *listen, *to)
	err = c.ForwardFrom(ctx, l, *to, func(err error) { fmt.Fprintln(os.Stderr, "virtkit-agent forward:", err) })
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent forward:", err)
		return 1
	}
	return 0
}

// stdio is stdin+stdout as one half-closable stream.
type stdio struct{}

func (stdio) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdio) Write(p []byte) (int, error) { return os.Stdout.Write(p) }
func (stdio) CloseWrite() error           { return os.Stdout.Close() }
func (stdio) Close() error                { os.Stdin.Close(); return os.Stdout.Close() }

func runConnect(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("connect", flag.ContinueOnError)
	port := fs.Int("port", 22, "guest TCP port reached through the agent")
	direct := fs.Bool("direct", false, "dial URL itself (e.g. vsock://CID:22, a guest sshd on vsock) instead of going through the agent")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: virtkit-agent connect [--port 22 | --direct] URL   (ssh -o ProxyCommand='virtkit-agent connect URL' root@guest)")
		return 2
	}
	url := fs.Arg(0)
	var conn io.ReadWriteCloser
	if *direct {
		c, err := addr.Dial(ctx, url)
		if err != nil {
			fmt.Fprintln(os.Stderr, "virtkit-agent connect:", err)
			return 1
		}
		conn = c
	} else {
		c, err := client.Dial(ctx, url)
		if err != nil {
			fmt.Fprintln(os.Stderr, "virtkit-agent connect:", err)
			return 1
		}
		defer c.Close()
		fc, err := c.Forward(ctx, *port)
		if err != nil {
			fmt.Fprintln(os.Stderr, "virtkit-agent connect:", err)
			return 1
		}
		conn = fc
	}
	client.Splice(stdio{}, conn)
	return 0
}
