// Command guestprog is the init of the test guests that check the vhost-user backends under a
// real kernel: it serves vsock streams for the host and does POSIX file work on a virtio-fs share.
// It prints "GUESTPROG <verdict>" lines on the console and powers the VM off.
//
// Usage (kernel command line after "--"): vsock | fs TAG | fsbench TAG
package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"
)

func main() {
	syscall.Mount("proc", "/proc", "proc", 0, "")
	syscall.Mount("sysfs", "/sys", "sysfs", 0, "")
	syscall.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	args := os.Args[1:]
	fmt.Println("GUESTPROG start", args)
	var err error
	switch {
	case len(args) >= 1 && args[0] == "vsock":
		err = serveVsock()
	case len(args) >= 2 && args[0] == "fs":
		err = fsWork(args[1])
	case len(args) >= 2 && args[0] == "fsbench":
		err = fsBench(args[1])
	default:
		err = fmt.Errorf("unknown mode %q", args)
	}
	if err != nil {
		fmt.Println("GUESTPROG FAIL:", err)
	} else {
		fmt.Println("GUESTPROG PASS")
	}
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

// serveVsock echoes every stream on port 1024, dials the host on port 5000 and echoes what the
// host sends there, and returns when the host connects to port 1099.
func serveVsock() error {
	l, err := vsock.Listen(1024, nil)
	if err != nil {
		return fmt.Errorf("listen 1024: %w", err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	stop, err := vsock.Listen(1099, nil)
	if err != nil {
		return fmt.Errorf("listen 1099: %w", err)
	}
	fmt.Println("GUESTPROG listening")
	// Guest → host: dial CID 2 port 5000 until the host listens, then echo.
	go func() {
		for i := 0; i < 300; i++ {
			c, err := vsock.Dial(2, 5000, nil)
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			fmt.Println("GUESTPROG dialed host")
			io.Copy(c, c)
			c.Close()
			return
		}
		fmt.Println("GUESTPROG could not dial the host")
	}()
	c, err := stop.Accept()
	if err != nil {
		return err
	}
	// Say goodbye and wait for the host to hang up: powering off right after accept could
	// lose the kernel's RESPONSE still queued for the device.
	c.Write([]byte("bye\n"))
	io.Copy(io.Discard, c)
	c.Close()
	return nil
}

// fsWork mounts the share and exercises POSIX file operations.
func fsWork(tag string) error {
	os.MkdirAll("/mnt", 0o755)
	if err := syscall.Mount(tag, "/mnt", "virtiofs", 0, ""); err != nil {
		return fmt.Errorf("mount virtiofs %s: %w", tag, err)
	}
	// The host put hello.txt in the share.
	b, err := os.ReadFile("/mnt/hello.txt")
	if err != nil || string(b) != "hello from the host\n" {
		return fmt.Errorf("read hello.txt: %q %v", b, err)
	}
	steps := []struct {
		what string
		f    func() error
	}{
		{"mkdir", func() error { return os.MkdirAll("/mnt/d/e", 0o755) }},
		{"write", func() error { return os.WriteFile("/mnt/d/e/f", bytes.Repeat([]byte("x"), 1<<20+3), 0o644) }},
		{"read back", func() error {
			b, err := os.ReadFile("/mnt/d/e/f")
			if err == nil && (len(b) != 1<<20+3 || b[len(b)-1] != 'x') {
				err = fmt.Errorf("got %d bytes", len(b))
			}
			return err
		}},
		{"append+fsync", func() error {
			f, err := os.OpenFile("/mnt/d/e/f", os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			f.Write([]byte("tail"))
			if err := f.Sync(); err != nil {
				return err
			}
			return f.Close()
		}},
		{"rename", func() error { return os.Rename("/mnt/d/e/f", "/mnt/d/g") }},
		{"link", func() error { return os.Link("/mnt/d/g", "/mnt/d/h") }},
		{"symlink", func() error { return os.Symlink("g", "/mnt/d/s") }},
		{"readlink", func() error {
			t, err := os.Readlink("/mnt/d/s")
			if err == nil && t != "g" {
				err = fmt.Errorf("readlink = %q", t)
			}
			return err
		}},
		{"stat nlink", func() error {
			var st syscall.Stat_t
			if err := syscall.Stat("/mnt/d/h", &st); err != nil {
				return err
			}
			if st.Nlink != 2 || st.Size != 1<<20+7 {
				return fmt.Errorf("nlink %d size %d", st.Nlink, st.Size)
			}
			return nil
		}},
		{"chmod", func() error { return os.Chmod("/mnt/d/g", 0o600) }},
		{"truncate", func() error { return os.Truncate("/mnt/d/g", 10) }},
		{"readdir", func() error {
			es, err := os.ReadDir("/mnt/d")
			if err != nil {
				return err
			}
			var names []string
			for _, e := range es {
				names = append(names, e.Name())
			}
			if strings.Join(names, ",") != "e,g,h,s" {
				return fmt.Errorf("entries %v", names)
			}
			return nil
		}},
		{"unlink", func() error { return os.Remove("/mnt/d/h") }},
		{"rmdir", func() error { return os.Remove("/mnt/d/e") }},
		{"many files", func() error {
			for i := 0; i < 200; i++ {
				if err := os.WriteFile(fmt.Sprintf("/mnt/d/n%03d", i), []byte{byte(i)}, 0o644); err != nil {
					return err
				}
			}
			es, err := os.ReadDir("/mnt/d")
			if err == nil && len(es) != 202 {
				err = fmt.Errorf("%d entries", len(es))
			}
			return err
		}},
		{"result", func() error { return os.WriteFile("/mnt/guest-done", []byte("ok\n"), 0o644) }},
	}
	for _, s := range steps {
		if err := s.f(); err != nil {
			return fmt.Errorf("%s: %w", s.what, err)
		}
	}
	return syscall.Unmount("/mnt", 0)
}

// fsBench times file work on the share and prints GUESTPROG BENCH lines.
func fsBench(tag string) error {
	os.MkdirAll("/mnt", 0o755)
	if err := syscall.Mount(tag, "/mnt", "virtiofs", 0, ""); err != nil {
		return fmt.Errorf("mount virtiofs %s: %w", tag, err)
	}
	dir := "/mnt/bench"
	os.RemoveAll(dir)
	os.MkdirAll(dir, 0o755)
	const files = 1000
	name := func(i int) string { return filepath.Join(dir, fmt.Sprintf("f%d", i)) }
	t0 := time.Now()
	for i := 0; i < files; i++ {
		if err := os.WriteFile(name(i), []byte("0123456789"), 0o644); err != nil {
			return err
		}
	}
	report("create", files, t0)
	// Both daemons run with cache=auto (entries and attributes trusted for 1 s): wait until
	// they expire so every stat below asks the daemon (LOOKUP to revalidate, then GETATTR).
	time.Sleep(1200 * time.Millisecond)
	t0 = time.Now()
	for i := 0; i < files; i++ {
		var st syscall.Stat_t
		if err := syscall.Stat(name(i), &st); err != nil {
			return err
		}
	}
	report("stat", files, t0)
	// 32 MiB written and read back cold, bigReps times over (one such pair takes ~0.5 s in a
	// TCG guest, where a pause of the host's vCPU thread moves a single one by 20%); reads land
	// in one buffer, so the guest's own allocation is not timed.
	const bigReps = 4
	big := bytes.Repeat([]byte{7}, 32<<20)
	buf := make([]byte, len(big))
	var wt, rt time.Duration
	for r := 0; r < bigReps; r++ {
		p := filepath.Join(dir, fmt.Sprintf("big%d", r))
		t0 = time.Now()
		if err := os.WriteFile(p, big, 0o644); err != nil {
			return err
		}
		wt += time.Since(t0)
		// Drop the page cache so the read goes to the device.
		os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
		t0 = time.Now()
		if err := readInto(p, buf); err != nil {
			return err
		}
		rt += time.Since(t0)
	}
	reportMB("write32M", 32*bigReps, wt)
	reportMB("read32M", 32*bigReps, rt)
	time.Sleep(1200 * time.Millisecond)
	t0 = time.Now()
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	report("unlink", files+bigReps, t0)
	return syscall.Unmount("/mnt", 0)
}

func report(what string, n int, t0 time.Time) {
	d := time.Since(t0)
	fmt.Printf("GUESTPROG BENCH %s %d ops %.0f ops/s\n", what, n, float64(n)/d.Seconds())
}

// readInto reads the file at p, which must be len(buf) bytes long, into buf.
func readInto(p string, buf []byte) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.ReadFull(f, buf); err != nil {
		return fmt.Errorf("read %s: %w", p, err)
	}
	return nil
}

func reportMB(what string, mb int, d time.Duration) {
	fmt.Printf("GUESTPROG BENCH %s %.1f MB/s\n", what, float64(mb)/d.Seconds())
}
