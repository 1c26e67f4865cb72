// Package vhostuser_test benchmarks virtkit's vhost-user backends against their peers:
// `virtkit virtiofsd` against QEMU's C virtiofsd (/usr/lib/qemu/virtiofsd) on the same share,
// through the Go frontend harness (FUSE ops/s, 4 KiB and 1 MiB reads and writes) and inside a TCG
// guest (file work); and the hybrid-vsock backend (connection set-up, stream MB/s) with a real
// guest. run.sh prints the ratios.
package vhostuser_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/vhostuser/vhostusertest"
	"github.com/virtkit/virtkit/vhostuser/vsock"
)

const cVirtiofsd = "/usr/lib/qemu/virtiofsd"

// daemon starts a virtio-fs daemon on share and returns its socket, a function that stops it
// and tells the CPU time it used (its sandboxed children included), and its PID.
func daemon(b *testing.B, name, share string) (string, func() time.Duration, int) {
	b.Helper()
	sock := filepath.Join(b.TempDir(), "fs.sock")
	var cmd *exec.Cmd
	switch name {
	case "virtkit":
		cmd = exec.Command(cmdtest.Binary(b, "virtkit"), "virtiofsd", "--socket-path", sock, "--shared-dir", share, "--log-level", "error")
	case "c-virtiofsd":
		if _, err := os.Stat(cVirtiofsd); err != nil {
			cmdtest.Missing(b, "%s (Debian qemu-system-x86)", cVirtiofsd)
		}
		cmd = exec.Command(cVirtiofsd, "--socket-path="+sock, "-o", "source="+share, "-o", "cache=auto", "-o", "log_level=err")
	}
	// The daemons' own messages go to a log, not into the benchmark lines run.sh parses.
	logf, err := os.Create(filepath.Join(b.TempDir(), name+".log"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { logf.Close() })
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	stop := sync.OnceFunc(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	b.Cleanup(stop)
	// Wait for the socket file: probing it with a connection would use up the C daemon, which
	// serves exactly one frontend and exits.
	for i := 0; i < 500; i++ {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return sock, func() time.Duration {
				stop()
				return cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
			}, cmd.Process.Pid
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.Fatalf("%s did not listen on %s", name, sock)
	return "", nil, 0
}

// sampleCPU samples treeCPU(pid) while the daemon runs, until the returned function is called
// (or the benchmark ends); that returns the last sample. A daemon's exit status counts a child (the C daemon's sandboxed
// one) only if the parent reaped it, and once gave the C daemon 10 ms for a whole guest run, so
// the guest benchmark takes the larger of the two. Only it samples: a sample reads all of /proc
// (~1 ms of CPU), which the harness benchmarks do not need beside their own start and end reads.
func sampleCPU(b *testing.B, pid int) func() time.Duration {
	var sampled atomic.Int64
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			if c := int64(treeCPU(pid)); c > sampled.Load() {
				sampled.Store(c)
			}
			select {
			case <-t.C:
			case <-done:
				return
			}
		}
	}()
	stop := sync.OnceValue(func() time.Duration {
		close(done)
		<-stopped
		return time.Duration(sampled.Load())
	})
	b.Cleanup(func() { stop() })
	return stop
}

// treeCPU is the CPU time used so far by process pid and its descendants, from the scheduler's
// per-thread nanosecond counters (/proc/PID/task/TID/schedstat): precise enough to divide by a
// few thousand requests, unlike the 10 ms ticks of /proc/PID/stat. Per-request CPU is the
// steadier comparison on a shared machine, where the requests per second of one daemon swing
// by ±15% between runs.
func treeCPU(pid int) time.Duration {
	procs, _ := os.ReadDir("/proc")
	parent := map[int]int{}
	for _, e := range procs {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
		if i := bytes.LastIndexByte(st, ')'); i > 0 {
			var state string
			var ppid int
			if _, err := fmt.Sscan(string(st[i+1:]), &state, &ppid); err == nil {
				parent[p] = ppid
			}
		}
	}
	inTree := func(p int) bool {
		for i := 0; i < 64 && p > 1; i++ {
			if p == pid {
				return true
			}
			p = parent[p]
		}
		return false
	}
	var total time.Duration
	for p := range parent {
		if !inTree(p) {
			continue
		}
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", p))
		for _, t := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", p, t.Name()))
			if err != nil {
				continue
			}
			var ns int64
			if _, err := fmt.Sscan(string(b), &ns); err == nil {
				total += time.Duration(ns)
			}
		}
	}
	return total
}

var daemons = []string{"virtkit", "c-virtiofsd"}

// openFile starts daemon d on a share holding one 1 MiB file of random bytes (data) and returns
// a harness client with the file looked up (e) and open for reading and writing (fh), and the
// daemon's PID.
func openFile(b *testing.B, d string) (c *vhostusertest.FUSE, e vhostusertest.Entry, fh uint64, pid int, data []byte) {
	b.Helper()
	share := b.TempDir()
	data = make([]byte, 1<<20)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(share, "file"), data, 0o644); err != nil {
		b.Fatal(err)
	}
	sock, _, pid := daemon(b, d, share)
	f, err := vhostusertest.Dial(sock, 64<<20)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	if c, err = vhostusertest.NewFUSE(f, 256); err != nil {
		b.Fatal(err)
	}
	if e, err = c.Lookup(1, "file"); err != nil {
		b.Fatal(err)
	}
	if fh, err = c.Open(e.NodeID, uint32(os.O_RDWR)); err != nil {
		b.Fatal(err)
	}
	return c, e, fh, pid, data
}

// BenchmarkFUSEPaced sends 1 MiB requests laid out as a guest lays them out at a TCG guest's
// pace for big files (one every ~5 ms: the guest copies each MiB into its page cache in
// between) and reports each request's latency and the daemon's CPU per request. Back to back,
// a daemon never sleeps between requests; here it does every time, as with a real guest.
func BenchmarkFUSEPaced(b *testing.B) {
	cmdtest.RequireRoot(b)
	const gap = 5 * time.Millisecond
	for _, d := range daemons {
		b.Run("daemon="+d, func(b *testing.B) {
			c, e, fh, pid, data := openFile(b, d)
			c.Pages = true
			buf := make([]byte, 0, 1<<20)
			for _, op := range []struct {
				name string
				f    func() error
			}{
				{"write1m-pages", func() error { _, err := c.Write(e.NodeID, fh, 0, data); return err }},
				{"read1m-pages", func() error { _, err := c.ReadInto(buf, e.NodeID, fh, 0, 1<<20); return err }},
			} {
				for i := 0; i < 50; i++ { // warm up, as BenchmarkFUSE does
					if err := op.f(); err != nil {
						b.Fatal(err)
					}
				}
				b.Run("op="+op.name, func(b *testing.B) {
					lat := make([]time.Duration, b.N)
					time.Sleep(gap)
					// The CPU of the whole loop: what a daemon does while it waits (timers,
					// the runtime's threads) is part of a request's cost.
					cpu0 := treeCPU(pid)
					for i := range b.N {
						t0 := time.Now()
						if err := op.f(); err != nil {
							b.Fatal(err)
						}
						lat[i] = time.Since(t0)
						time.Sleep(gap)
					}
					cpu := treeCPU(pid) - cpu0
					slices.Sort(lat)
					b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-us")
					b.ReportMetric(float64(lat[len(lat)*9/10].Nanoseconds())/1e3, "p90-us")
					b.ReportMetric(float64(cpu.Nanoseconds())/1e3/float64(b.N), "daemon-us/op")
				})
			}
		})
	}
}

// BenchmarkFUSE measures FUSE operations through the virtqueue harness, one request at a time.
func BenchmarkFUSE(b *testing.B) {
	cmdtest.RequireRoot(b) // both daemons sandbox themselves into namespaces
	for _, d := range daemons {
		b.Run("daemon="+d, func(b *testing.B) {
			c, e, fh, pid, data := openFile(b, d)
			buf := make([]byte, 0, 1<<20) // reads land here: the harness allocates nothing per read
			// paged runs f with requests laid out as a Linux guest lays them out: a 1 MiB
			// READ or WRITE as 256 page-sized descriptors apart in guest memory.
			paged := func(f func() error) error {
				c.Pages = true
				defer func() { c.Pages = false }()
				return f()
			}
			ops := []struct {
				name  string
				bytes int64
				f     func(i int) error
			}{
				{"lookup", 0, func(int) error { _, err := c.Lookup(1, "file"); return err }},
				{"getattr", 0, func(int) error { _, err := c.Getattr(e.NodeID); return err }},
				{"read4k", 4096, func(i int) error {
					_, err := c.ReadInto(buf, e.NodeID, fh, uint64(i%256)*4096, 4096)
					return err
				}},
				{"read1m", 1 << 20, func(int) error { _, err := c.ReadInto(buf, e.NodeID, fh, 0, 1<<20); return err }},
				{"read1m-pages", 1 << 20, func(int) error {
					return paged(func() error { _, err := c.ReadInto(buf, e.NodeID, fh, 0, 1<<20); return err })
				}},
				{"write4k", 4096, func(i int) error {
					_, err := c.Write(e.NodeID, fh, uint64(i%256)*4096, data[:4096])
					return err
				}},
				{"write1m", 1 << 20, func(int) error { _, err := c.Write(e.NodeID, fh, 0, data); return err }},
				{"write1m-pages", 1 << 20, func(int) error {
					return paged(func() error { _, err := c.Write(e.NodeID, fh, 0, data); return err })
				}},
			}
			// Warm both daemons up first (threads, heap, page tables for guest memory): the
			// first op measured used to absorb a fresh Go process's heap growth (~0.2 page
			// faults per request), which a long-running daemon does not pay.
			for _, op := range ops {
				for i := 0; i < 200; i++ {
					if err := op.f(i); err != nil {
						b.Fatal(err)
					}
				}
			}
			for _, op := range ops {
				b.Run("op="+op.name, func(b *testing.B) {
					if op.bytes > 0 {
						b.SetBytes(op.bytes)
					}
					cpu0 := treeCPU(pid)
					b.ResetTimer()
					for i := 0; i < b.N; i++ {
						if err := op.f(i); err != nil {
							b.Fatal(err)
						}
					}
					b.StopTimer()
					b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
					b.ReportMetric(float64((treeCPU(pid)-cpu0).Nanoseconds())/1e3/float64(b.N), "daemon-us/op")
				})
			}
			// Leave the share unchanged for the next daemon: the writes wrote data itself.
			got, _ := c.Read(e.NodeID, fh, 0, 1<<20)
			if !bytes.Equal(got, data) {
				b.Fatal("file content changed")
			}
		})
	}
}

var benchLine = regexp.MustCompile(`GUESTPROG BENCH (\S+) (?:\d+ ops )?([\d.]+) (ops/s|MB/s)`)

// BenchmarkGuestFS boots a TCG guest that does file work on the share served by each daemon.
func BenchmarkGuestFS(b *testing.B) {
	cmdtest.RequireRoot(b)
	initrd := vhostusertest.Initramfs(b, vhostusertest.GuestProg(b))
	for _, d := range daemons {
		b.Run("daemon="+d, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				sock, cpu, pid := daemon(b, d, freshShare(b))
				sampled := sampleCPU(b, pid)
				vm := vhostusertest.Boot(b, vhostusertest.VMConfig{
					Initramfs: initrd, InitArgs: []string{"fsbench", "share0"},
					Devices: []string{"-chardev", "socket,id=fs0,path=" + sock, "-device", "vhost-user-fs-device,chardev=fs0,tag=share0,queue-size=1024"},
				})
				if err := vm.Wait(300 * time.Second); err != nil {
					b.Fatal(err)
				}
				out := vm.Output()
				ms := benchLine.FindAllStringSubmatch(out, -1)
				if len(ms) == 0 {
					b.Fatalf("no results:\n%s", out)
				}
				for _, m := range ms {
					v, _ := strconv.ParseFloat(m[2], 64)
					b.ReportMetric(v, m[1]+"-"+m[3])
				}
				b.ReportMetric(float64(max(cpu(), sampled()).Milliseconds()), "daemon-cpu-ms")
			}
		})
	}
}

// freshShare mounts an empty tmpfs for one guest run. On a shared ext4 /tmp each run's creates
// paid for the previous run's deletes (ext4 skips inode numbers freed in the last 30 s, scanning
// past each one): the same binary measured 243–813 creates/s depending on what ran just before.
func freshShare(b *testing.B) string {
	dir := b.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=256m,mode=0755"); err != nil {
		b.Fatalf("tmpfs share: %v", err)
	}
	b.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// BenchmarkVsockGuest measures the hybrid-vsock backend with a real TCG guest: connection set-up
// (CONNECT → OK through the guest's accept) and echo throughput.
func BenchmarkVsockGuest(b *testing.B) {
	initrd := vhostusertest.Initramfs(b, vhostusertest.GuestProg(b))
	dir := b.TempDir()
	cfg := vsock.Config{Socket: filepath.Join(dir, "v.vhost"), UDS: filepath.Join(dir, "vm.vsock"), CID: 3, Logger: zerolog.Nop()}
	be, err := vsock.Serve(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer be.Close()
	vm := vhostusertest.Boot(b, vhostusertest.VMConfig{Initramfs: initrd, InitArgs: []string{"vsock"},
		Devices: []string{"-chardev", "socket,id=v0,path=" + cfg.Socket, "-device", "vhost-user-vsock-device,chardev=v0"}})
	if err := vm.WaitConsole("GUESTPROG listening", 60*time.Second); err != nil {
		b.Fatal(err)
	}
	dial := func() net.Conn {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := addr.Dial(ctx, fmt.Sprintf("hvsock://%s:1024", cfg.UDS))
		if err != nil {
			b.Fatal(err)
		}
		return c
	}
	b.Run("connect", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			dial().Close()
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "us/connect")
	})
	b.Run("echo", func(b *testing.B) {
		const n = 4 << 20
		buf := make([]byte, n)
		b.SetBytes(2 * n) // both directions cross the device
		for i := 0; i < b.N; i++ {
			c := dial()
			go func() { c.Write(buf); c.(*net.UnixConn).CloseWrite() }()
			got, err := io.Copy(io.Discard, c)
			c.Close()
			if err != nil || got != n {
				b.Fatalf("echo %d bytes: %v", got, err)
			}
		}
	})
}
