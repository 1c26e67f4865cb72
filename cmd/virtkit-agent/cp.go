package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/virtkit/virtkit/agent/archive"
	"github.com/virtkit/virtkit/agent/client"
)

func init() {
	register("cp", "copy files: cp --connect URL SRC :GUESTDIR | cp --connect URL :GUESTPATH DIR  (- is a tar stream)", runCp)
}

func runCp(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("cp", flag.ContinueOnError)
	connect := fs.String("connect", os.Getenv("VIRTKIT_AGENT"), "agent endpoint URL (default $VIRTKIT_AGENT)")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, `usage: virtkit-agent cp --connect URL SRC DST
  guest paths start with ':'. The destination is a folder (created if missing):
    cp ./site :/srv          copies ./site to /srv/site in the guest
    cp :/var/log/app.log .   copies the guest file into ./app.log
  '-' as SRC reads a tar stream from stdin; '-' as DST writes one to stdout.`)
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *connect == "" || fs.NArg() != 2 {
		fs.Usage()
		return 2
	}
	src, dst := fs.Arg(0), fs.Arg(1)
	in, out := strings.HasPrefix(dst, ":"), strings.HasPrefix(src, ":")
	if in == out {
		fmt.Fprintln(os.Stderr, "virtkit-agent cp: exactly one of SRC and DST must be a guest path (starting with ':')")
		return 2
	}
	c, err := client.Dial(ctx, *connect)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent cp:", err)
		return 1
	}
	defer c.Close()
	if in {
		err = copyIn(ctx, c, src, dst[1:])
	} else {
		err = copyOut(ctx, c, src[1:], dst)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent cp:", err)
		return 1
	}
	return 0
}

func copyIn(ctx context.Context, c *client.Client, src, dst string) error {
	if src == "-" {
		return c.CopyIn(ctx, dst, os.Stdin)
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(archive.Pack(pw, src)) }()
	err := c.CopyIn(ctx, dst, pr)
	pr.CloseWithError(io.ErrClosedPipe)
	return err
}

func copyOut(ctx context.Context, c *client.Client, src, dst string) error {
	if dst == "-" {
		return c.CopyOut(ctx, src, os.Stdout)
	}
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := archive.Unpack(pr, dst)
		pr.CloseWithError(io.ErrClosedPipe)
		done <- err
	}()
	err := c.CopyOut(ctx, src, pw)
	pw.CloseWithError(err)
	if uerr := <-done; uerr != nil {
		return uerr // the local side failed first; the stream error is only its echo
	}
	return err
}
