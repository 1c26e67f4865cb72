package virtiofs

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/vhostuser/vhostusertest"
)

// startDaemon runs `virtkit virtiofsd` (sandboxed unless extra says otherwise) and waits for its
// socket.
func startDaemon(t testing.TB, share string, extra ...string) string {
	return startDaemonWith(t, share, nil, extra...)
}

// startDaemonWith runs the daemon under a wrapper command (e.g. prlimit).
func startDaemonWith(t testing.TB, share string, wrapper []string, extra ...string) string {
	t.Helper()
	return startDaemonOut(t, share, wrapper, os.Stderr, extra...)
}

// startDaemonOut runs the daemon with its log going to out.
func startDaemonOut(t testing.TB, share string, wrapper []string, out io.Writer, extra ...string) string {
	t.Helper()
	bin := cmdtest.Binary(t, "virtkit")
	sock := filepath.Join(t.TempDir(), "fs.sock")
	ctx, cancel := context.WithCancel(context.Background())
	argv := append(append(append([]string{}, wrapper...), bin, "virtiofsd", "--socket-path", sock, "--shared-dir", share, "--log-level", "warn"), extra...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
	})
	// Wait until the daemon accepts (a probe session that ends at once is harmless to it).
	for i := 0; i < 500; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("virtiofsd did not accept on %s", sock)
	return ""
}

// TestQEMUGuest mounts a share in a real guest and does POSIX file work on it.
func TestQEMUGuest(t *testing.T) {
	cmdtest.RequireRoot(t) // the sandbox as root needs no user namespace; rootless is tested below
	initrd := vhostusertest.Initramfs(t, vhostusertest.GuestProg(t))
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "hello.txt"), []byte("hello from the host\n"), 0o644)
	var log cmdtest.Buffer // the request counts the daemon logs when QEMU goes
	sock := startDaemonOut(t, share, nil, &log, "--log-level", "debug")
	vm := vhostusertest.Boot(t, vhostusertest.VMConfig{
		Initramfs: initrd, InitArgs: []string{"fs", "share0"},
		Devices: []string{"-chardev", "socket,id=fs0,path=" + sock, "-device", "vhost-user-fs-device,chardev=fs0,tag=share0,queue-size=1024"},
	})
	if err := vm.Wait(120 * time.Second); err != nil {
		t.Fatal(err)
	}
	out := vm.Output()
	if !strings.Contains(out, "GUESTPROG PASS") {
		t.Fatalf("guest file work failed:\n%s", out)
	}
	b, err := os.ReadFile(filepath.Join(share, "guest-done"))
	if err != nil || string(b) != "ok\n" {
		t.Fatalf("guest's file not on the host: %q %v", b, err)
	}
	var st os.FileInfo
	if st, err = os.Lstat(filepath.Join(share, "d", "s")); err != nil || st.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("guest symlink: %v %v", st, err)
	}
	// The guest closed every file it wrote: on a file system whose close does nothing (ext4,
	// tmpfs, …) the daemon opened them FOPEN_NOFLUSH and the guest kernel sent no FLUSH; on any
	// other it must still send them.
	d, err := os.Open(share)
	if err != nil {
		t.Fatal(err)
	}
	noop := closeIsNoop(int(d.Fd()))
	d.Close()
	var counts struct{ Requests map[string]int }
	deadline := time.Now().Add(10 * time.Second)
	for counts.Requests == nil && time.Now().Before(deadline) {
		for _, line := range strings.Split(log.String(), "\n") {
			if strings.Contains(line, "virtiofs: frontend gone") {
				if err := json.Unmarshal([]byte(line), &counts); err != nil {
					t.Fatalf("%v: %s", err, line)
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	flushes, creates := counts.Requests["FLUSH"], counts.Requests["CREATE"]
	t.Logf("share on a file system with a no-op close: %v; requests: %v", noop, counts.Requests)
	if creates == 0 || counts.Requests["WRITE"] == 0 {
		t.Fatalf("no CREATE or WRITE counted: cannot tell FLUSHes from it\n%s", log.String())
	}
	if noop != (flushes == 0) {
		t.Fatalf("close is a no-op on the share: %v, but the guest sent %d FLUSH requests", noop, flushes)
	}
}
