package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/virtkit/virtkit/agent/client"
)

func init() {
	register("exec", "run a command in the guest: exec --connect URL [-t] [-e K=V] [-w DIR] [-u USER] -- CMD...", runExec)
}

func runExec(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("exec", flag.ContinueOnError)
	connect := fs.String("connect", os.Getenv("VIRTKIT_AGENT"), "agent endpoint URL (default $VIRTKIT_AGENT)")
	tty := fs.Bool("t", false, "allocate a terminal")
	interactive := fs.Bool("i", true, "pass stdin to the command")
	var envs repeatFlag
	fs.Var(&envs, "e", "KEY=VALUE (or KEY, taken from here) for the command; repeatable")
	dir := fs.String("w", "", "working directory in the guest")
	user := fs.String("u", "", "user: name, uid, name:group or uid:gid")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	argv := fs.Args()
	if *connect == "" || len(argv) == 0 {
		fmt.Fprintln(os.Stderr, "usage: virtkit-agent exec --connect URL [-t] [-e K=V] [-w DIR] [-u USER] -- CMD...")
		return 2
	}
	req := client.ExecRequest{Argv: argv, Dir: *dir, User: *user, TTY: *tty}
	for _, e := range envs {
		if !strings.Contains(e, "=") {
			e += "=" + os.Getenv(e)
		}
		req.Env = append(req.Env, e)
	}
	code, err := execRemote(ctx, *connect, req, *interactive)
	if err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent exec:", err)
		return client.ExitCode(err)
	}
	return code
}

// execRemote runs req with this process's terminal attached (client.Attach: stdin, signals,
// terminal size) and returns the exit code.
func execRemote(ctx context.Context, url string, req client.ExecRequest, interactive bool) (int, error) {
	c, err := client.Dial(context.WithoutCancel(ctx), url)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	st, err := c.Attach(ctx, req, client.Terminal{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Interactive: interactive})
	if err != nil {
		return 0, err
	}
	return st.Code, nil
}
