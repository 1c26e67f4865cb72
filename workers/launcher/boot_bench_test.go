package launcher

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/oci"
)

// BenchmarkBootToReady boots the Debian fixture image again and again and splits boot-to-ready
// into: prepare (folder, overlay disk, helpers), vmm (VMM process start), kernel (kernel uptime when
// PID 1 started), agent_init (PID 1 start → serving), ready (VMM start → agent answers on vsock),
// first_exec (`true` round trip). Under TCG these are emulation figures; on a KVM host the same
// benchmark gives the real ones. Run: go test -run ^$ -bench BootToReady ./workers/launcher/
func BenchmarkBootToReady(b *testing.B) {
	cmdtest.Tool(b, "qemu-system-x86_64")
	l, rootfs := benchLauncher(b)
	var prep, vmmT, kern, initT, ready, first, total []time.Duration
	for i := 0; i < b.N; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		vm, err := l.Start(ctx, Request{Name: "bench", Rootfs: rootfs, MemoryMiB: 512})
		if err != nil {
			b.Fatal(err)
		}
		c, err := client.Dial(ctx, vm.ExecURL)
		if err != nil {
			b.Fatal(err)
		}
		info, err := c.Info(ctx)
		if err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		if st, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"true"}}, nil, nil, nil); err != nil || st.Code != 0 {
			b.Fatalf("first exec: %v %v", st, err)
		}
		first = append(first, time.Since(t0))
		c.Close()
		prep, vmmT, ready, total = append(prep, vm.Timings.Prepare), append(vmmT, vm.Timings.VMM), append(ready, vm.Timings.Ready), append(total, vm.Timings.Total)
		kern = append(kern, info.KernelBoot)
		if n := len(info.Boot); n > 0 {
			initT = append(initT, info.Boot[n-1].Since)
		}
		vm.Stop(ctx)
		cancel()
	}
	for name, d := range map[string][]time.Duration{"prepare": prep, "vmm": vmmT, "kernel": kern, "agent_init": initT, "ready": ready, "first_exec": first, "total": total} {
		b.ReportMetric(float64(median(d).Microseconds())/1000, name+"-ms")
	}
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration{}, d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// benchLauncher converts the Debian fixture (cached in a folder kept across runs) and returns a
// launcher over a fresh state folder.
func benchLauncher(b *testing.B) (*Launcher, string) {
	agent := cmdtest.Binary(b, "virtkit-agent")
	virtkit := cmdtest.Binary(b, "virtkit")
	cache := filepath.Join(os.TempDir(), "vk-bench-images")
	ctx := context.Background()
	bundle, err := oci.Convert(ctx, "tar:"+imagetest.DebianRootfs(b), oci.ConvertOptions{Store: cache, Agent: agent, NoJournal: true})
	if err != nil {
		b.Fatal(err)
	}
	l, err := New(Config{StateDir: b.TempDir(), Kernel: cmdtest.Kernel(b), VMM: "auto", Virtkit: virtkit, Logger: zerolog.Nop(),
		NewDisk: func(ctx context.Context, path string, size int64) error {
			_, err := ext4.WriteEmpty(ctx, path, ext4.Options{Size: size, NoJournal: true})
			return err
		}})
	if err != nil {
		b.Fatal(err)
	}
	return l, bundle.Rootfs
}
