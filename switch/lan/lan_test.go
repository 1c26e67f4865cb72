package lan_test

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/switch/dhcp"
	"github.com/virtkit/virtkit/switch/frame"
	"github.com/virtkit/virtkit/switch/lan"
)

func TestParseListen(t *testing.T) {
	for _, tc := range []struct {
		in, path, name, mac, ip string
		bad                     bool
	}{
		{in: "unix:///run/vm1.sock", path: "/run/vm1.sock", name: "vm1"},
		{in: "unix:///tmp/x.sock_1025,name=web,mac=02:00:00:00:00:05,ip=10.77.0.5", path: "/tmp/x.sock_1025", name: "web", mac: "02:00:00:00:00:05", ip: "10.77.0.5"},
		{in: "tcp://1.2.3.4:5", bad: true},
		{in: "unix://", bad: true},
		{in: "unix:///a,name=Bad_Name", bad: true},
		{in: "unix:///a,mac=zz", bad: true},
		{in: "unix:///a,ip=::1", bad: true},
		{in: "unix:///a,colour=red", bad: true},
		{in: "unix:///a,name", bad: true},
	} {
		path, l, err := lan.ParseListen(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("%q: accepted", tc.in)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		if path != tc.path || l.Name != tc.name || (tc.mac != "" && l.MAC.String() != tc.mac) || (tc.ip != "" && l.IP.String() != tc.ip) {
			t.Errorf("%q: got %s %+v", tc.in, path, l)
		}
	}
}

func TestParseForward(t *testing.T) {
	f, err := lan.ParseForward("tcp:127.0.0.1:8080=web:80")
	if err != nil || f != (lan.Forward{Proto: "tcp", Listen: "127.0.0.1:8080", Name: "web", Port: 80}) {
		t.Errorf("%+v %v", f, err)
	}
	if f, err = lan.ParseForward("127.0.0.1:8080=web:80"); err != nil || f.Proto != "tcp" {
		t.Errorf("default proto: %+v %v", f, err)
	}
	for _, bad := range []string{"tcp:127.0.0.1:8080", "udp:127.0.0.1:53=dns:53", "tcp:nohost=web:80", "tcp:127.0.0.1:1=web:0", "tcp:127.0.0.1:1=:80", "tcp:127.0.0.1:1=web:99999"} {
		if _, err := lan.ParseForward(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func FuzzParseListen(f *testing.F) {
	f.Add("unix:///tmp/x.sock_1025,name=web,mac=02:00:00:00:00:05,ip=10.77.0.5")
	f.Add("unix:///a,,=")
	f.Fuzz(func(t *testing.T, s string) {
		path, l, err := lan.ParseListen(s)
		if err == nil && (path == "" || l.Name == "") {
			t.Fatalf("%q: empty path or name", s)
		}
	})
}

func FuzzParseForward(f *testing.F) {
	f.Add("tcp:127.0.0.1:8080=web:80")
	f.Add("[::1]:1=a:1")
	f.Fuzz(func(t *testing.T, s string) {
		fw, err := lan.ParseForward(s)
		if err == nil && (fw.Port == 0 || fw.Name == "" || fw.Proto != "tcp") {
			t.Fatalf("%q: %+v", s, fw)
		}
	})
}

// rawPort connects a test-driven peer to the switch over a real unix socket.
type rawPort struct {
	t   *testing.T
	c   net.Conn
	r   *frame.Reader
	w   *frame.Writer
	mac frame.MAC
}

func newRawPort(t *testing.T, sw *lan.Switch, dir string, lease lan.Lease, mac frame.MAC) *rawPort {
	t.Helper()
	path := filepath.Join(dir, lease.Name+".sock")
	if _, err := sw.ListenPort(path, lease); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawPort{t: t, c: c, r: frame.NewReader(c, 0), w: frame.NewWriter(c), mac: mac}
}

// next returns the next frame accepted by keep, failing after a timeout.
func (p *rawPort) next(keep func([]byte) bool) []byte {
	p.t.Helper()
	p.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		f, err := p.r.Next()
		if err != nil {
			p.t.Fatalf("read: %v", err)
		}
		if keep(f) {
			return append([]byte(nil), f...)
		}
	}
}

// TestInProcess drives the switch with hand-made frames: DHCP, ARP with the gateway, switching
// between ports and the lease checks. It needs no privileges.
func TestInProcess(t *testing.T) {
	sw, err := lan.New(lan.Config{Subnet: netip.MustParsePrefix("10.66.0.0/24"), MTU: 9000,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)})
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Close()
	dir, err := os.MkdirTemp("", "vk-lan-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	gw, gwHW := sw.Gateway()
	gwMAC, _ := frame.MACFrom(gwHW)
	a := newRawPort(t, sw, dir, lan.Lease{Name: "a"}, frame.MAC{2, 0, 0, 0, 0, 0xa})
	b := newRawPort(t, sw, dir, lan.Lease{Name: "b", IP: netip.MustParseAddr("10.66.0.50")}, frame.MAC{2, 0, 0, 0, 0, 0xb})

	// DHCP: the first frame teaches the switch a's MAC.
	if err := a.w.Write(dhcp.ClientFrame(dhcp.NewDiscover(a.mac, 77, "a"))); err != nil {
		t.Fatal(err)
	}
	f := a.next(func(f []byte) bool { _, _, ok, err := dhcp.ParseFrame(f, dhcp.ClientPort); return ok && err == nil })
	offer, _, _, _ := dhcp.ParseFrame(f, dhcp.ClientPort)
	l, err := dhcp.LeaseFrom(offer)
	if err != nil || offer.Type() != dhcp.Offer || l.IP != netip.MustParsePrefix("10.66.0.2/24") || l.Router != gw || l.MTU != 9000 || l.Domain != "lan" || l.Hostname != "a" {
		t.Fatalf("offer %+v: %+v %v", offer, l, err)
	}
	if frame.Src(f) != gwMAC || frame.Dst(f) != a.mac {
		t.Errorf("offer frame %s → %s", frame.Src(f), frame.Dst(f))
	}

	// ARP for the gateway is answered by the gateway.
	arp := func(sender frame.MAC, senderIP, target netip.Addr) []byte {
		f := make([]byte, frame.EthHeaderLen+28)
		frame.PutEth(f, frame.Broadcast, sender, frame.TypeARP)
		p := f[frame.EthHeaderLen:]
		copy(p, []byte{0, 1, 8, 0, 6, 4, 0, 1})
		copy(p[8:14], sender[:])
		s4, t4 := senderIP.As4(), target.As4()
		copy(p[14:18], s4[:])
		copy(p[24:28], t4[:])
		return f
	}
	aIP := l.IP.Addr()
	a.w.Write(arp(a.mac, aIP, gw))
	f = a.next(func(f []byte) bool { return frame.Type(f) == frame.TypeARP })
	rep, err := frame.ParseARP(f)
	if err != nil || rep.Op != frame.ARPReply || rep.SenderMAC != gwMAC || rep.SenderIP != gw {
		t.Fatalf("ARP reply: %+v %v", rep, err)
	}

	// b learns its MAC from an ARP request for a; a sees the broadcast, not the gateway.
	b.w.Write(arp(b.mac, netip.MustParseAddr("10.66.0.50"), aIP))
	f = a.next(func(f []byte) bool { return frame.Type(f) == frame.TypeARP })
	if got, _ := frame.ParseARP(f); got.SenderMAC != b.mac {
		t.Errorf("a got ARP %+v", got)
	}
	// Unicast a → b at L2.
	u := frame.BuildUDP4(b.mac, a.mac, netip.AddrPortFrom(aIP, 1000), netip.MustParseAddrPort("10.66.0.50:2000"), []byte("hi b"))
	a.w.Write(u)
	f = b.next(func(f []byte) bool { return frame.Type(f) == frame.TypeIPv4 })
	if string(f) != string(u) {
		t.Errorf("b got %x, want %x", f, u)
	}

	// Spoofing: a's frames with b's IP, with b's MAC, and ARP claiming b's IP are dropped.
	a.w.Write(frame.BuildUDP4(b.mac, a.mac, netip.MustParseAddrPort("10.66.0.50:1"), netip.MustParseAddrPort("10.66.0.50:2"), nil))
	a.w.Write(frame.BuildUDP4(frame.Broadcast, b.mac, netip.AddrPortFrom(aIP, 1), netip.MustParseAddrPort("10.66.0.255:2"), nil))
	a.w.Write(arp(a.mac, netip.MustParseAddr("10.66.0.50"), gw))
	a.w.Write(append(make([]byte, 12), 0x86, 0xdd, 0)) // IPv6 from a zero MAC
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, _ := sw.Port("a")
		d := c.Counters().Drops
		if d[lan.DropSpoofIP] >= 2 && d[lan.DropSpoofMAC] >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("drops on a: %v", d)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Nothing spoofed reached b: the next frame b sees is a fresh one from a.
	u2 := frame.BuildUDP4(b.mac, a.mac, netip.AddrPortFrom(aIP, 1000), netip.MustParseAddrPort("10.66.0.50:2000"), []byte("second"))
	a.w.Write(u2)
	if f := b.next(func(f []byte) bool { return frame.Type(f) == frame.TypeIPv4 }); string(f) != string(u2) {
		t.Errorf("b got %x after the spoofed frames, want the second datagram", f)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, cfg := range []lan.Config{
		{Subnet: netip.MustParsePrefix("fd00::/64")},
		{Subnet: netip.MustParsePrefix("10.0.0.0/31")},
		{Subnet: netip.MustParsePrefix("10.0.0.0/24"), Gateway: netip.MustParseAddr("10.0.1.1")},
		{MTU: 100},
		{MTU: 70000},
	} {
		if sw, err := lan.New(cfg); err == nil {
			sw.Close()
			t.Errorf("%+v accepted", cfg)
		}
	}
	sw, err := lan.New(lan.Config{Subnet: netip.MustParsePrefix("10.0.0.0/30")})
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Close()
	c1, c2 := net.Pipe()
	defer c2.Close()
	if _, err := sw.AddPort(c1, lan.Lease{Name: "one"}); err != nil {
		t.Fatal(err)
	}
	c3, c4 := net.Pipe()
	defer c4.Close()
	if _, err := sw.AddPort(c3, lan.Lease{Name: "two"}); err == nil {
		t.Error("a /30 holds one guest; the second was accepted")
	}
	for _, l := range []lan.Lease{{Name: "one"}, {Name: ""}, {Name: "x", IP: netip.MustParseAddr("10.0.0.1")}, {Name: "y", MAC: net.HardwareAddr{1, 0, 0, 0, 0, 1}}} {
		c5, c6 := net.Pipe()
		if _, err := sw.AddPort(c5, l); err == nil {
			t.Errorf("lease %+v accepted", l)
		}
		c6.Close()
	}
}

func TestListenPortStaleSocket(t *testing.T) {
	sw, err := lan.New(lan.Config{Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Close()
	dir, _ := os.MkdirTemp("", "vk-lan-")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "p.sock")
	// A socket file nobody listens on any more.
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := sw.ListenPort(path, lan.Lease{Name: "p"}); err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	// A live one is not taken over.
	if _, err := sw.ListenPort(path, lan.Lease{Name: "q"}); err == nil {
		t.Error("a second port took over a live socket")
	}
	if _, ok := sw.Port("q"); ok {
		t.Error("the failed port was kept")
	}
}
