// Package agent benchmarks virtkit's exec path (agent/client → agent/execserver over a unix
// socket) against the usual ways into a machine or container: `ssh HOST true` and `nsenter`.
// bench.sh sets up the peers (an sshd on loopback) and prints ratios.
//
// Latency benchmarks report p50 and p99 per operation; throughput benchmarks report MB/s.
package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/agent/execserver"
	"github.com/virtkit/virtkit/cmd/cmdtest"
)

const streamBytes = 1 << 30

func startAgent(b *testing.B) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), "agent.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { execserver.New(execserver.Config{}).Serve(ctx, l); close(done) }()
	b.Cleanup(func() { cancel(); <-done })
	return "unix://" + path
}

// latency runs op b.N times and reports p50/p99.
func latency(b *testing.B, op func() error) {
	b.Helper()
	d := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		t := time.Now()
		if err := op(); err != nil {
			b.Fatal(err)
		}
		d = append(d, time.Since(t))
	}
	b.StopTimer()
	slices.Sort(d)
	b.ReportMetric(float64(d[len(d)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(d[len(d)*99/100].Microseconds()), "p99-µs")
}

type counter struct{ n int64 }

func (c *counter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// BenchmarkExecTrue is one exec round trip of `true` through the library: connect, hello,
// exec, exit status.
func BenchmarkExecTrue(b *testing.B) {
	url := startAgent(b)
	c, err := client.Dial(context.Background(), url)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	latency(b, func() error {
		st, err := c.Exec(ctx, client.ExecRequest{Argv: []string{"true"}}, nil, nil, nil)
		if err == nil && st.Code != 0 {
			err = fmt.Errorf("exit %d", st.Code)
		}
		return err
	})
}

// BenchmarkCLIExecTrue is `virtkit-agent exec --connect unix://… -- true`: a fresh client process
// each time, the fair peer of `ssh host true` and `nsenter … true`.
func BenchmarkCLIExecTrue(b *testing.B) {
	url := startAgent(b)
	bin := cmdtest.Binary(b, "virtkit-agent")
	latency(b, func() error { return exec.Command(bin, "exec", "-i=false", "--connect", url, "--", "true").Run() })
}

func BenchmarkStdout(b *testing.B) {
	url := startAgent(b)
	c, err := client.Dial(context.Background(), url)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.SetBytes(streamBytes)
	for range b.N {
		var w counter
		st, err := c.Exec(context.Background(), client.ExecRequest{Argv: []string{"head", "-c", fmt.Sprint(streamBytes), "/dev/zero"}}, nil, &w, nil)
		if err != nil || st.Code != 0 || w.n != streamBytes {
			b.Fatalf("%d bytes, %+v, %v", w.n, st, err)
		}
	}
}

func sshArgs(b *testing.B) []string {
	port, key := os.Getenv("BENCH_SSH_PORT"), os.Getenv("BENCH_SSH_KEY")
	if port == "" || key == "" {
		b.Skip("BENCH_SSH_PORT/BENCH_SSH_KEY not set: run bench.sh (it starts an sshd on loopback)")
	}
	return []string{"-p", port, "-i", key, "-o", "BatchMode=yes", "-o", "GSSAPIAuthentication=no", "-o", "ControlMaster=no", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1"}
}

func BenchmarkSSHTrue(b *testing.B) {
	args := append(sshArgs(b), "true")
	latency(b, func() error { return exec.Command("ssh", args...).Run() })
}

func BenchmarkSSHStdout(b *testing.B) {
	args := append(sshArgs(b), fmt.Sprintf("head -c %d /dev/zero", streamBytes))
	b.SetBytes(streamBytes)
	for range b.N {
		cmd := exec.Command("ssh", args...)
		var w counter
		cmd.Stdout = &w
		if err := cmd.Run(); err != nil || w.n != streamBytes {
			b.Fatalf("%d bytes, %v", w.n, err)
		}
	}
}

// nsenterArgs enters the namespaces of a fresh `unshare` container (what `docker exec` does
// under the hood).
func nsenterArgs(b *testing.B) []string {
	cmdtest.RequireRoot(b)
	cmdtest.Tool(b, "unshare")
	cmd := exec.Command("unshare", "--fork", "--pid", "--mount-proc", "--mount", "--uts", "--ipc", "--net", "sleep", "1000")
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	var child string
	for range 200 {
		if c, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid)); err == nil && len(strings.TrimSpace(string(c))) > 0 {
			child = strings.Fields(string(c))[0]
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if child == "" {
		b.Fatal("unshare started no child")
	}
	return []string{"-t", child, "-m", "-u", "-i", "-n", "-p", "--"}
}

func BenchmarkNsenterTrue(b *testing.B) {
	args := append(nsenterArgs(b), "true")
	latency(b, func() error { return exec.Command("nsenter", args...).Run() })
}

func BenchmarkNsenterStdout(b *testing.B) {
	args := append(nsenterArgs(b), "head", "-c", fmt.Sprint(streamBytes), "/dev/zero")
	b.SetBytes(streamBytes)
	for range b.N {
		cmd := exec.Command("nsenter", args...)
		var w counter
		cmd.Stdout = &w
		if err := cmd.Run(); err != nil || w.n != streamBytes {
			b.Fatalf("%d bytes, %v", w.n, err)
		}
	}
}

// BenchmarkLocalTrue is the floor: fork+exec of `true` with no transport at all.
func BenchmarkLocalTrue(b *testing.B) {
	latency(b, func() error { return exec.Command("true").Run() })
}
