// Package switchbench measures virtkit's userspace LAN against its peers with iperf3, side by
// side in one run: the same guest namespace and relay in front of `virtkit switch` and gvproxy,
// and slirp4netns and pasta each with their own tap. Guests reach an iperf3 server on the host's
// loopback through each backend's "host" address; single-stream and 4-stream TCP, guest→host and
// host→guest, at MTU 1500 and 65520. Metrics: Gbit/s received, and CPU seconds per GB moved
// spent by the backend's processes (for virtkit and gvproxy that includes the guest-side relay).
//
// Run with ./bench/switch/run.sh, which prints the ratios. Needs root; gvproxy from
// `go install github.com/containers/gvisor-tap-vsock/cmd/gvproxy@v0.8.9`, Debian's slirp4netns,
// passt and iperf3.
package switchbench

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/switch/lan/lantest"
)

// backend is one network implementation under test.
type backend struct {
	name string
	// start brings the guest namespace's network up and returns the address under which the
	// guest reaches the host's loopback, and the PIDs whose CPU time counts.
	start func(b *testing.B, ns *lantest.Netns, mtu int) (hostAddr string, pids []int)
}

var iperfTime = 6 // seconds per run; override with VK_BENCH_SECONDS

func BenchmarkIperf(b *testing.B) {
	cmdtest.RequireRoot(b)
	if s, err := strconv.Atoi(os.Getenv("VK_BENCH_SECONDS")); err == nil && s > 0 {
		iperfTime = s
	}
	iperf := cmdtest.Tool(b, "iperf3")
	vk := cmdtest.Binary(b, "virtkit")
	agent := cmdtest.Binary(b, "virtkit-agent")
	port := 15201 + os.Getpid()%1000
	srv := exec.Command(iperf, "-s", "-B", "127.0.0.1", "-p", strconv.Itoa(port))
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Process.Kill(); srv.Wait() })

	backends := []backend{
		{"virtkit", func(b *testing.B, ns *lantest.Netns, mtu int) (string, []int) {
			return startVirtkit(b, ns, mtu, vk, agent, false)
		}},
		{"virtkit-nooffload", func(b *testing.B, ns *lantest.Netns, mtu int) (string, []int) {
			return startVirtkit(b, ns, mtu, vk, agent, true)
		}},
		{"gvproxy", func(b *testing.B, ns *lantest.Netns, mtu int) (string, []int) {
			gv := gvproxyPath(b)
			sock := filepath.Join(b.TempDir(), "gv.sock")
			p := startProc(b, gv, "-listen-qemu", "unix://"+sock, "-mtu", strconv.Itoa(mtu))
			waitPath(b, sock)
			a := ns.Start(agent, "net", "--connect", "unix://"+sock, "--tap", "vk0", "--resolv-conf", "", "--quiet",
				"--mac", "5a:94:ef:e4:0c:ee", "--ip", "192.168.127.2/24", "--gateway", "192.168.127.1", "--mtu", strconv.Itoa(mtu))
			waitAddr(b, ns, "192.168.127.2")
			return "192.168.127.254", []int{p, a.Cmd.Process.Pid}
		}},
		{"slirp4netns", func(b *testing.B, ns *lantest.Netns, mtu int) (string, []int) {
			bin := cmdtest.Tool(b, "slirp4netns")
			m := min(mtu, 65520)
			p := startProc(b, bin, "--configure", "--mtu="+strconv.Itoa(m), "--netns-type=path", "/var/run/netns/"+ns.Name, "tap0")
			waitAddr(b, ns, "10.0.2.100")
			return "10.0.2.2", []int{p}
		}},
		{"pasta", func(b *testing.B, ns *lantest.Netns, mtu int) (string, []int) {
			bin := cmdtest.Tool(b, "pasta")
			p := startProc(b, bin, "--foreground", "--quiet", "--runas", "0", "--config-net", "--mtu", strconv.Itoa(mtu), "--netns", "/var/run/netns/"+ns.Name)
			gw := ""
			lantest.WaitFor(b, 10*time.Second, "pasta default route", func() error {
				out, _ := ns.Run(5*time.Second, "ip", "-4", "route", "show", "default")
				f := strings.Fields(out)
				if len(f) < 3 {
					return fmt.Errorf("no default route: %q", out)
				}
				gw = f[2]
				return nil
			})
			return gw, []int{p}
		}},
	}
	// All backends are up at once and each case runs them back to back, so that they share
	// whatever else the machine is doing; run.sh repeats the whole sweep (-count) and takes medians.
	for _, mtu := range []int{1500, 65520} {
		b.Run(fmt.Sprintf("mtu=%d", mtu), func(b *testing.B) {
			type env struct {
				ns   *lantest.Netns
				host string
				pids []int
			}
			envs := make([]env, len(backends))
			for i, be := range backends {
				ns := lantest.NewNetns(b, "bn")
				host, pids := be.start(b, ns, mtu)
				envs[i] = env{ns, host, pids}
			}
			// Warm up each path (ARP, first connections, page faults) before measuring.
			for _, e := range envs {
				e.ns.Run(20*time.Second, iperf, "-c", e.host, "-p", strconv.Itoa(port), "-t", "1")
			}
			for _, dir := range []string{"g2h", "h2g"} {
				for _, streams := range []int{1, 4} {
					for i, be := range backends {
						b.Run(fmt.Sprintf("dir=%s/streams=%d/net=%s", dir, streams, be.name), func(b *testing.B) {
							for n := 0; n < b.N; n++ {
								runIperf(b, envs[i].ns, iperf, envs[i].host, port, dir, streams, envs[i].pids)
							}
						})
					}
				}
			}
		})
	}
}

func runIperf(b *testing.B, ns *lantest.Netns, iperf, host string, port int, dir string, streams int, pids []int) {
	args := []string{iperf, "-J", "-c", host, "-p", strconv.Itoa(port), "-t", strconv.Itoa(iperfTime), "-O", "1", "-P", strconv.Itoa(streams)}
	if dir == "h2g" {
		args = append(args, "-R")
	}
	type result struct {
		End struct {
			SumReceived struct {
				Bytes         float64 `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	var res result
	var cpu float64
	for attempt := 1; ; attempt++ {
		cpu0 := cpuSeconds(pids)
		out, err := ns.Run(time.Duration(iperfTime+30)*time.Second, args...)
		cpu = cpuSeconds(pids) - cpu0
		res = result{}
		jerr := json.Unmarshal([]byte(out), &res)
		if err == nil && jerr == nil && res.End.SumReceived.Bytes > 0 {
			break
		}
		// The server may still be finishing the previous test ("server is busy"): retry.
		b.Logf("iperf3 attempt %d: %v %v %s", attempt, err, jerr, res.Error)
		if attempt == 3 {
			b.Fatalf("iperf3: %v %v %s\n%s", err, jerr, res.Error, out)
		}
		time.Sleep(2 * time.Second)
	}
	gb := res.End.SumReceived.Bytes / 1e9
	b.ReportMetric(res.End.SumReceived.BitsPerSecond/1e9, "Gbit/s")
	if gb > 0 {
		b.ReportMetric(cpu/gb, "cpu-s/GB")
	}
}

// startVirtkit runs `virtkit switch` and the relay in ns, with or without offloads.
func startVirtkit(b *testing.B, ns *lantest.Netns, mtu int, vk, agent string, noOffload bool) (string, []int) {
	sock := filepath.Join(b.TempDir(), "g.sock")
	subnet := "10.77.0.0/24"
	if noOffload {
		subnet = "10.78.0.0/24"
	}
	args := []string{"switch", "--log-level", "warn", "--listen", "unix://" + sock + ",name=g", "--mtu", strconv.Itoa(mtu),
		"--allow-host-loopback", "--subnet", subnet}
	aargs := []string{agent, "net", "--connect", "unix://" + sock, "--tap", "vk0", "--resolv-conf", "", "--quiet"}
	if noOffload {
		args = append(args, "--no-offload")
		aargs = append(aargs, "--no-offload")
	}
	sw := startProc(b, vk, args...)
	waitPath(b, sock)
	a := ns.Start(aargs...)
	gw := strings.TrimSuffix(subnet, "0/24")
	waitAddr(b, ns, gw)
	return gw + "1", []int{sw, a.Cmd.Process.Pid}
}

// startProc starts a host process, killed at cleanup, and returns its PID.
func startProc(b *testing.B, bin string, args ...string) int {
	b.Helper()
	c := exec.Command(bin, args...)
	log, err := os.Create(filepath.Join(b.TempDir(), filepath.Base(bin)+".log"))
	if err != nil {
		b.Fatal(err)
	}
	c.Stdout, c.Stderr = log, log
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.Start(); err != nil {
		b.Fatalf("start %s: %v", bin, err)
	}
	b.Cleanup(func() {
		syscall.Kill(-c.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if b.Failed() {
			out, _ := os.ReadFile(log.Name())
			b.Logf("%s output:\n%s", bin, out)
		}
		log.Close()
	})
	return c.Process.Pid
}

func waitPath(b *testing.B, p string) {
	lantest.WaitFor(b, 10*time.Second, "socket "+p, func() error { _, err := os.Stat(p); return err })
}

func waitAddr(b *testing.B, ns *lantest.Netns, prefix string) {
	lantest.WaitFor(b, 20*time.Second, "guest address "+prefix, func() error {
		out, _ := ns.Run(5*time.Second, "ip", "-4", "-o", "addr")
		if !strings.Contains(out, "inet "+prefix) {
			return fmt.Errorf("addresses: %q", out)
		}
		return nil
	})
}

func gvproxyPath(b *testing.B) string {
	for _, p := range []string{os.Getenv("GVPROXY"), filepath.Join(os.Getenv("HOME"), "go", "bin", "gvproxy")} {
		if p != "" {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	if p, err := exec.LookPath("gvproxy"); err == nil {
		return p
	}
	cmdtest.Missing(b, "gvproxy not found: go install github.com/containers/gvisor-tap-vsock/cmd/gvproxy@v0.8.9")
	return ""
}

// cpuSeconds sums user+system CPU time of the processes (and their reaped children).
func cpuSeconds(pids []int) float64 {
	var ticks float64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		// Fields after the command: state(0) … utime(11) stime(12) cutime(13) cstime(14).
		for _, i := range []int{11, 12, 13, 14} {
			v, _ := strconv.ParseFloat(f[i], 64)
			ticks += v
		}
	}
	return ticks / 100 // USER_HZ
}
