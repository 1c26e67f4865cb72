package agent

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/virtkit/virtkit/agent/agenttest"
	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// bootVM boots a microVM (TCG on hosts without usable KVM) with the agent as init and returns a
// client over hybrid vsock through the vhost-user vsock backend.
func bootVM(b *testing.B) *client.Client {
	b.Helper()
	cmdtest.Heavy(b)
	root := agenttest.BusyboxRoot(b)
	initrd := filepath.Join(b.TempDir(), "initrd.cpio")
	agenttest.Initramfs(b, root, initrd)
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	v := agenttest.BootVM(b, ctx, "rdinit=/sbin/virtkit-agent virtkit.mode=agent virtkit.net=none", "-initrd", initrd)
	wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer wcancel()
	c, err := client.WaitReady(wctx, v.URL())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// BenchmarkVMExecTrue is an exec round trip of `true` in a microVM over hybrid vsock.
func BenchmarkVMExecTrue(b *testing.B) {
	c := bootVM(b)
	ctx := context.Background()
	latency(b, func() error {
		st, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"true"}}, nil, nil, nil)
		if err == nil && st.Code != 0 {
			err = fmt.Errorf("exit %d", st.Code)
		}
		return err
	})
}

// BenchmarkVMStdout streams 64 MiB of a guest command's stdout to the host over hybrid vsock.
func BenchmarkVMStdout(b *testing.B) {
	c := bootVM(b)
	const n = 64 << 20
	b.SetBytes(n)
	b.ResetTimer()
	for range b.N {
		var w counter
		st, err := c.Exec(context.Background(), client.ExecRequest{Argv: []string{"head", "-c", fmt.Sprint(n), "/dev/zero"}}, nil, &w, nil)
		if err != nil || st.Code != 0 || w.n != n {
			b.Fatalf("%d bytes, %+v, %v", w.n, st, err)
		}
	}
}

// BenchmarkVMGuestPipe is the in-guest baseline for BenchmarkVMStdout: the same bytes through a
// pipe inside the guest, no vsock at all (under TCG the emulated CPU, not the transport, is the
// limit).
func BenchmarkVMGuestPipe(b *testing.B) {
	c := bootVM(b)
	const n = 64 << 20
	b.SetBytes(n)
	b.ResetTimer()
	for range b.N {
		st, err := c.Exec(context.Background(), client.ExecRequest{Argv: []string{"sh", "-c", fmt.Sprintf("head -c %d /dev/zero | cat >/dev/null", n)}}, nil, nil, nil)
		if err != nil || st.Code != 0 {
			b.Fatalf("%+v, %v", st, err)
		}
	}
}
