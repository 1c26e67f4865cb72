package cli

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/virtkit/virtkit/switch/dhcp"
	"github.com/virtkit/virtkit/switch/frame"
)

// TestSwitchCommand runs `virtkit switch` in-process, takes a DHCP lease on its port as a guest
// relay would, and stops it.
func TestSwitchCommand(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("VIRTKIT_CONFIG", filepath.Join(dir, "config.toml"))
	os.WriteFile(filepath.Join(dir, "config.toml"), nil, 0o644)
	sock := filepath.Join(dir, "a.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan int, 1)
	go func() {
		done <- Execute(ctx, []string{"switch", "--state-dir", dir, "--log-level", "warn", "--subnet", "10.55.0.0/24",
			"--listen", "unix://" + sock + ",name=a,mac=02:00:00:00:00:0a", "--host", "db=10.55.0.50", "--mtu", "9000"})
	}()
	var c net.Conn
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		if c, err = net.Dial("unix", sock); err == nil {
			break
		}
		select {
		case code := <-done:
			t.Fatalf("virtkit switch exited with %d", code)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no switch socket: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer c.Close()
	mac := frame.MAC{2, 0, 0, 0, 0, 0xa}
	if err := frame.NewWriter(c).Write(dhcp.ClientFrame(dhcp.NewDiscover(mac, 9, ""))); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	r := frame.NewReader(c, 0)
	for {
		f, err := r.Next()
		if err != nil {
			t.Fatalf("waiting for the offer: %v", err)
		}
		m, _, ok, err := dhcp.ParseFrame(f, dhcp.ClientPort)
		if !ok || err != nil {
			continue
		}
		l, err := dhcp.LeaseFrom(m)
		if err != nil || l.IP != netip.MustParsePrefix("10.55.0.2/24") || l.MTU != 9000 || l.Hostname != "a" || l.Router != netip.MustParseAddr("10.55.0.1") {
			t.Fatalf("lease %+v %v", l, err)
		}
		break
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("exit code %d after cancel", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("virtkit switch did not stop")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}

func TestSwitchCommandErrors(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("VIRTKIT_CONFIG", filepath.Join(dir, "config.toml"))
	os.WriteFile(filepath.Join(dir, "config.toml"), nil, 0o644)
	for _, args := range [][]string{
		{"--listen", "tcp://127.0.0.1:1"},
		{"--host", "noequals"},
		{"--forward", "tcp:127.0.0.1:1"},
		{"--allow", "not-a-cidr"},
		{"--subnet", "10.0.0.0/31"},
		{"--mtu", "70000"},
	} {
		code := Execute(context.Background(), append([]string{"switch", "--state-dir", dir}, args...))
		if code == 0 {
			t.Errorf("switch %q succeeded", args)
		}
	}
}
