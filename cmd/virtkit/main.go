// Command virtkit is the host side of virtkit: the daemon (serve), the VM, image and network tools,
// and the GitLab custom executor hooks. The command tree lives in package cli; this main only owns the
// process-wide context and the exit code.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/virtkit/virtkit/cmd/virtkit/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Execute(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}
