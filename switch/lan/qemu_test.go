package lan_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/switch/lan"
	"github.com/virtkit/virtkit/workers/launcher/vmm"
)

// TestQEMUStream is the interoperability proof for the framing: a real guest kernel behind QEMU's
// own `-netdev stream` (no virtkit relay) joins the switch with its virtio-net driver, takes a
// DHCP lease with busybox udhcpc, resolves a .lan name and downloads 4 MB from the host through
// the gateway, with the switch's TCP offload on (so frames above the MTU reach virtio-net).
func TestQEMUStream(t *testing.T) {
	cmdtest.Heavy(t)
	kernel := cmdtest.Kernel(t)
	qemu := cmdtest.Tool(t, "qemu-system-x86_64")
	busybox := cmdtest.Tool(t, "busybox")
	cpio := cmdtest.Tool(t, "cpio")

	big := make([]byte, 4<<20)
	for i := range big {
		big[i] = byte(i*31 + i>>9)
	}
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(big) }))
	t.Cleanup(web.Close)
	port := web.Listener.Addr().(*net.TCPAddr).Port

	sw, err := lan.New(lan.Config{Subnet: netip.MustParsePrefix("10.90.0.0/24"), AllowHostLoopback: true,
		DNSHosts: map[string]netip.Addr{"web": netip.MustParseAddr("10.90.0.1")},
		Logger:   zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sw.Close() })
	dir := t.TempDir()
	sock := filepath.Join(dir, "vm.sock")
	if _, err := sw.ListenPort(sock, lan.Lease{Name: "vmq", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0x51}}); err != nil {
		t.Fatal(err)
	}

	// A busybox initramfs whose /init takes the lease, fetches and reports on the serial console.
	root := filepath.Join(dir, "root")
	for _, d := range []string{"bin", "proc", "sys", "dev", "etc", "tmp"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	b, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(root, "bin", "busybox"), b, 0o755)
	os.WriteFile(filepath.Join(root, "udhcpc.sh"), []byte(`#!/bin/busybox sh
[ "$1" = bound ] || exit 0
ifconfig $interface $ip netmask $subnet ${mtu:+mtu $mtu} up
route add default gw $router
echo "nameserver $dns" > /etc/resolv.conf
echo "VK-LEASE $ip $router $dns $hostname"
`), 0o755)
	os.WriteFile(filepath.Join(root, "init"), []byte(fmt.Sprintf(`#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
ifconfig lo up
ifconfig eth0 up
udhcpc -i eth0 -n -q -f -t 10 -T 1 -s /udhcpc.sh
nslookup web.lan 2>&1 | grep -q 10.90.0.1 && echo VK-DNS-OK
echo "VK-MD5 $(wget -q -O - http://web.lan:%d/big | md5sum)"
echo VK-DONE
poweroff -f
`, port)), 0o755)
	initrd := filepath.Join(dir, "initrd.cpio")
	mk := exec.Command("sh", "-c", "find . | "+cpio+" -o -H newc --quiet > "+initrd)
	mk.Dir = root
	if out, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v\n%s", err, out)
	}

	cmdline := "console=ttyS0 panic=-1 reboot=t pci=off quiet"
	if khz := vmm.HostKHz(); khz > 0 {
		cmdline += " tsc_early_khz=" + strconv.Itoa(khz)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu, "-M", "microvm,rtc=on", "-accel", "tcg", "-m", "256",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
		"-global", "virtio-mmio.force-legacy=false",
		"-kernel", kernel, "-initrd", initrd, "-append", cmdline,
		"-netdev", "stream,id=n0,server=off,addr.type=unix,addr.path="+sock,
		"-device", "virtio-net-device,netdev=n0,mac=02:00:00:00:00:51")
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	console := string(out)
	if len(console) > 6000 {
		console = "…" + console[len(console)-6000:]
	}
	if err != nil && !strings.Contains(console, "VK-DONE") {
		t.Fatalf("qemu: %v\n%s", err, console)
	}
	for _, l := range strings.Split(console, "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "VK-") {
			t.Log(strings.TrimSpace(l))
		}
	}
	want := map[string]string{
		"lease": "VK-LEASE 10.90.0.2 10.90.0.1 10.90.0.1 vmq",
		"dns":   "VK-DNS-OK",
		"md5":   "VK-MD5 " + md5hex(big),
	}
	for what, line := range want {
		if !strings.Contains(console, line) {
			t.Errorf("%s: console lacks %q:\n%s", what, line, console)
		}
	}
	c := counters(sw, "vmq")
	if c.Drops[lan.DropSpoofIP] != 0 || c.Drops[lan.DropSpoofMAC] != 0 || c.TxBytes < 4<<20 {
		t.Errorf("port counters %+v", c)
	}
}
