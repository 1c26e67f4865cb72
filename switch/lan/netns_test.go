package lan_test

import (
	"crypto/md5"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/switch/frame"
	"github.com/virtkit/virtkit/switch/lan"
	"github.com/virtkit/virtkit/switch/lan/lantest"
)

// fakeUpstream is a DNS server on the host's loopback playing the host resolver.
func fakeUpstream(t *testing.T, answers map[string][]netip.Addr) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var m dnsmessage.Message
			if m.Unpack(buf[:n]) != nil || len(m.Questions) != 1 {
				continue
			}
			q := m.Questions[0]
			m.Response, m.RecursionAvailable = true, true
			ips, ok := answers[strings.TrimSuffix(q.Name.String(), ".")]
			if !ok {
				m.RCode = dnsmessage.RCodeNameError
			}
			for _, ip := range ips {
				if q.Type == dnsmessage.TypeA && ip.Is4() {
					m.Answers = append(m.Answers, dnsmessage.Resource{
						Header: dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 60},
						Body:   &dnsmessage.AResource{A: ip.As4()}})
				}
			}
			b, _ := m.Pack()
			pc.WriteTo(b, from)
		}
	}()
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

type guest struct {
	ns    *lantest.Netns
	agent *lantest.Proc
	name  string
	ip    string
}

func TestNamespaces(t *testing.T) {
	cmdtest.RequireRoot(t)
	agentBin := cmdtest.Binary(t, "virtkit-agent")
	cmdtest.Tool(t, "busybox")
	cmdtest.Tool(t, "udhcpc")
	cmdtest.Tool(t, "curl")
	cmdtest.Tool(t, "socat")

	// Unprivileged ping sockets for the ICMP echo egress (a per-boot sysctl; restored afterwards).
	const pingRange = "/proc/sys/net/ipv4/ping_group_range"
	if old, err := os.ReadFile(pingRange); err == nil {
		os.WriteFile(pingRange, []byte("0 2147483647"), 0o644)
		t.Cleanup(func() { os.WriteFile(pingRange, old, 0o644) })
	}

	// A server in its own namespace, reached through a veth: the "internet".
	x := os.Getpid()%200 + 20
	srv := lantest.NewNetns(t, "srv")
	hostSide, srvIP := fmt.Sprintf("10.98.%d.1", x), fmt.Sprintf("10.98.%d.2", x)
	srv.Veth(hostSide+"/24", srvIP+"/24")
	www := t.TempDir()
	os.WriteFile(filepath.Join(www, "hello.txt"), []byte("hello from srv\n"), 0o644)
	srv.Start("busybox", "httpd", "-f", "-p", srvIP+":80", "-h", www)
	srv.Start("socat", "UDP4-RECVFROM:7777,fork", "EXEC:/bin/cat")

	// A server on the host's loopback.
	lo := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello from loopback\n") }))
	t.Cleanup(lo.Close)
	loPort := lo.Listener.Addr().(*net.TCPAddr).Port

	upstream := fakeUpstream(t, map[string][]netip.Addr{
		"good.test":  {netip.MustParseAddr(srvIP)},
		"evil.test":  {netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("169.254.169.254")},
		"mixed.test": {netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr(srvIP)},
	})

	sw, err := lan.New(lan.Config{
		Subnet:      netip.MustParsePrefix("10.88.0.0/24"),
		DNSHosts:    map[string]netip.Addr{"outside": netip.MustParseAddr(srvIP)},
		DNSUpstream: []netip.AddrPort{upstream},
		Logger:      zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sw.Close() })
	gw, _ := sw.Gateway()
	sock := t.TempDir()

	start := func(name string, lease lan.Lease, args ...string) *guest {
		t.Helper()
		lease.Name = name
		path := filepath.Join(sock, name+".sock")
		p, err := sw.ListenPort(path, lease)
		if err != nil {
			t.Fatal(err)
		}
		ns := lantest.NewNetns(t, name)
		a := ns.Start(append([]string{agentBin, "net", "--connect", "unix://" + path, "--tap", "vk0", "--resolv-conf", ns.ResolvConf()}, args...)...)
		return &guest{ns: ns, agent: a, name: name, ip: p.IP().String()}
	}
	hasAddr := func(g *guest) error {
		out, _ := g.ns.Run(5*time.Second, "ip", "-4", "-o", "addr", "show", "dev", "vk0")
		if !strings.Contains(out, " "+g.ip+"/24") {
			return fmt.Errorf("%s: vk0 has %q, want %s (agent said %q)", g.name, out, g.ip, g.agent.Output())
		}
		return nil
	}

	// g1: link only; Debian's busybox udhcpc takes the lease with its stock script.
	g1 := start("g1", lan.Lease{}, "--mode", "none")
	lantest.WaitFor(t, 10*time.Second, "g1 tap", func() error {
		_, err := g1.ns.Run(5*time.Second, "ip", "link", "show", "vk0")
		return err
	})
	if out, err := g1.ns.Run(30*time.Second, "udhcpc", "-i", "vk0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s", "/etc/udhcpc/default.script"); err != nil {
		t.Fatalf("udhcpc: %v\n%s", err, out)
	}
	if err := hasAddr(g1); err != nil {
		t.Fatal(err)
	}
	// g2: the agent's own DHCP client, with a fixed MAC and address.
	g2 := start("g2", lan.Lease{MAC: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x22}, IP: netip.MustParseAddr("10.88.0.22")}, "--mac", "02:00:00:00:00:22")
	lantest.WaitFor(t, 15*time.Second, "g2 dhcp", func() error { return hasAddr(g2) })
	// g3: static configuration from the command line.
	g3 := start("g3", lan.Lease{IP: netip.MustParseAddr("10.88.0.33")}, "--ip", "10.88.0.33/24", "--gateway", gw.String(), "--dns", gw.String(), "--search", "lan")
	lantest.WaitFor(t, 15*time.Second, "g3 static", func() error { return hasAddr(g3) })

	www2 := t.TempDir() // served by g2, outlives the subtests
	os.WriteFile(filepath.Join(www2, "x"), []byte("from g2\n"), 0o644)

	t.Run("DHCPOptions", func(t *testing.T) {
		rc, _ := os.ReadFile(g2.ns.ResolvConf())
		if !strings.Contains(string(rc), "nameserver "+gw.String()) || !strings.Contains(string(rc), "search lan") {
			t.Errorf("g2 resolv.conf = %q, want nameserver %s and search lan", rc, gw)
		}
		rc, _ = os.ReadFile(g1.ns.ResolvConf())
		if !strings.Contains(string(rc), "nameserver "+gw.String()) {
			t.Errorf("g1 (udhcpc) resolv.conf = %q, want nameserver %s", rc, gw)
		}
		out := g2.ns.MustRun("ip", "route", "show", "default")
		if !strings.Contains(out, "via "+gw.String()+" dev vk0") {
			t.Errorf("g2 default route = %q", out)
		}
		out = g2.ns.MustRun("ip", "link", "show", "vk0")
		if !strings.Contains(out, "mtu 1500") || !strings.Contains(out, "02:00:00:00:00:22") {
			t.Errorf("g2 vk0 = %q, want mtu 1500 and the leased MAC", out)
		}
	})

	t.Run("GuestToGuest", func(t *testing.T) {
		for _, pair := range [][2]*guest{{g1, g2}, {g2, g3}, {g3, g1}} {
			if out, err := pair[0].ns.Run(10*time.Second, "busybox", "ping", "-c", "2", "-W", "2", pair[1].ip); err != nil {
				t.Errorf("%s ping %s: %v\n%s", pair[0].name, pair[1].name, err, out)
			}
		}
		g2.ns.Start("busybox", "httpd", "-f", "-p", "8080", "-h", www2)
		lantest.WaitFor(t, 10*time.Second, "g1 → g2.lan:8080 by name", func() error {
			out, err := g1.ns.Run(5*time.Second, "curl", "-sS", "-m", "3", "http://g2.lan:8080/x")
			if err != nil || out != "from g2\n" {
				return fmt.Errorf("%v: %q", err, out)
			}
			return nil
		})
	})

	t.Run("DNS", func(t *testing.T) {
		out, err := g1.ns.Run(10*time.Second, "busybox", "nslookup", "g3.lan", gw.String())
		if err != nil || !strings.Contains(out, "10.88.0.33") {
			t.Errorf("nslookup g3.lan: %v\n%s", err, out)
		}
		out, err = g1.ns.Run(10*time.Second, "busybox", "nslookup", "outside.lan", gw.String())
		if err != nil || !strings.Contains(out, srvIP) {
			t.Errorf("nslookup outside.lan (Config.DNSHosts): %v\n%s", err, out)
		}
		sw.SetHost("late", netip.MustParseAddr("10.88.0.99"))
		out, err = g1.ns.Run(10*time.Second, "busybox", "nslookup", "late.lan", gw.String())
		if err != nil || !strings.Contains(out, "10.88.0.99") {
			t.Errorf("nslookup late.lan after SetHost: %v\n%s", err, out)
		}
		if out, err = g1.ns.Run(10*time.Second, "busybox", "nslookup", "nosuch.lan", gw.String()); err == nil || !strings.Contains(strings.ToLower(out), "nxdomain") {
			t.Errorf("nslookup nosuch.lan: want NXDOMAIN, got %v\n%s", err, out)
		}
		out, err = g3.ns.Run(10*time.Second, "sh", "-c", "printf '\\000\\030\\022\\064\\001\\000\\000\\001\\000\\000\\000\\000\\000\\000\\002g1\\003lan\\000\\000\\001\\000\\001' | socat -t 3 - TCP4:"+gw.String()+":53 | od -An -tu1 | tr -s ' \\n' ' '")
		if err != nil || !strings.Contains(out, strings.ReplaceAll(g1.ip, ".", " ")) {
			t.Errorf("DNS over TCP for g1.lan: %v %q", err, out)
		}
		out, err = g1.ns.Run(10*time.Second, "busybox", "nslookup", "good.test", gw.String())
		if err != nil || !strings.Contains(out, srvIP) {
			t.Errorf("nslookup good.test (forwarded upstream): %v\n%s", err, out)
		}
		out, _ = g1.ns.Run(10*time.Second, "busybox", "nslookup", "evil.test", gw.String())
		if strings.Contains(out, "127.0.0.1") || strings.Contains(out, "169.254.169.254") {
			t.Errorf("nslookup evil.test leaked forbidden answers:\n%s", out)
		}
		out, err = g1.ns.Run(10*time.Second, "busybox", "nslookup", "mixed.test", gw.String())
		if err != nil || strings.Contains(out, "169.254") || !strings.Contains(out, srvIP) {
			t.Errorf("nslookup mixed.test: want only %s: %v\n%s", srvIP, err, out)
		}
	})

	t.Run("Egress", func(t *testing.T) {
		out, err := g2.ns.Run(10*time.Second, "curl", "-sS", "-m", "5", "http://"+srvIP+"/hello.txt")
		if err != nil || out != "hello from srv\n" {
			t.Errorf("g2 curl srv: %v %q", err, out)
		}
		out, err = g1.ns.Run(10*time.Second, "busybox", "wget", "-q", "-O", "-", "http://good.test/hello.txt")
		if err != nil || out != "hello from srv\n" {
			t.Errorf("g1 wget good.test (resolv.conf from udhcpc, name from upstream): %v %q", err, out)
		}
		out, err = g3.ns.Run(10*time.Second, "sh", "-c", "echo ping-udp | socat -t 2 - UDP4:"+srvIP+":7777")
		if err != nil || out != "ping-udp\n" {
			t.Errorf("g3 udp echo via egress: %v %q", err, out)
		}
		out, err = g3.ns.Run(10*time.Second, "busybox", "ping", "-c", "2", "-W", "2", srvIP)
		if err != nil {
			t.Errorf("g3 ping srv (ICMP echo egress): %v\n%s", err, out)
		}
		// Refused port: the guest sees a reset at once, not a timeout.
		began := time.Now()
		_, err = g2.ns.Run(10*time.Second, "curl", "-sS", "-m", "5", "http://"+srvIP+":81/")
		if err == nil || time.Since(began) > 3*time.Second {
			t.Errorf("g2 curl to a closed port: err %v after %v, want a quick refusal", err, time.Since(began))
		}
	})

	t.Run("HalfClose", func(t *testing.T) {
		// The guest shuts its write side; the server still answers, and the answer arrives.
		srv.Start("socat", "TCP4-LISTEN:7070,reuseaddr", "EXEC:/usr/bin/rev")
		lantest.WaitFor(t, 10*time.Second, "half-close", func() error {
			out, err := g2.ns.Run(5*time.Second, "sh", "-c", "printf 'abc\\n' | socat -t 3 - TCP4:"+srvIP+":7070")
			if err != nil || out != "cba\n" {
				return fmt.Errorf("%v %q", err, out)
			}
			return nil
		})
	})

	t.Run("Policy", func(t *testing.T) {
		loURL := fmt.Sprintf("http://%s:%d/", gw, loPort)
		for _, u := range []string{loURL, "http://169.254.169.254/", fmt.Sprintf("http://%s:%d/", hostSide, loPort), "http://127.0.0.1:" + fmt.Sprint(loPort)} {
			if out, err := g1.ns.Run(10*time.Second, "curl", "-sS", "-m", "3", u); err == nil {
				t.Errorf("default policy: %s reachable: %q", u, out)
			}
		}
		if out, err := g1.ns.Run(10*time.Second, "busybox", "ping", "-c", "1", "-W", "1", "169.254.169.254"); err == nil {
			t.Errorf("ping 169.254.169.254 answered:\n%s", out)
		}
		sw.SetPolicy(true, nil, nil)
		out, err := g1.ns.Run(10*time.Second, "curl", "-sS", "-m", "3", loURL)
		if err != nil || out != "hello from loopback\n" {
			t.Errorf("with host loopback allowed: %v %q", err, out)
		}
		sw.SetPolicy(false, nil, []netip.Prefix{netip.MustParsePrefix(srvIP + "/32")})
		if out, err := g1.ns.Run(10*time.Second, "curl", "-sS", "-m", "3", "http://"+srvIP+"/hello.txt"); err == nil {
			t.Errorf("--deny %s: still reachable: %q", srvIP, out)
		}
		if out, err := g1.ns.Run(10*time.Second, "curl", "-sS", "-m", "3", loURL); err == nil {
			t.Errorf("loopback reachable after the policy was tightened: %q", out)
		}
		sw.SetPolicy(false, nil, nil)
	})

	t.Run("Forward", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		if err := sw.AddForward(lan.Forward{Proto: "tcp", Listen: addr, Name: "g2", Port: 8080}); err != nil {
			t.Fatal(err)
		}
		defer sw.RemoveForward(addr)
		lantest.WaitFor(t, 10*time.Second, "forward", func() error {
			resp, err := http.Get("http://" + addr + "/x")
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if string(b) != "from g2\n" {
				return fmt.Errorf("got %q", b)
			}
			return nil
		})
	})

	t.Run("AntiSpoof", func(t *testing.T) {
		// g3 takes g1's address: its frames are dropped and g1 stays reachable at its own MAC.
		before := counters(sw, "g3").Drops[lan.DropSpoofIP]
		g3.ns.MustRun("ip", "addr", "add", g1.ip+"/32", "dev", "vk0")
		g3.ns.Run(5*time.Second, "busybox", "arping", "-U", "-c", "2", "-I", "vk0", "-s", g1.ip, g1.ip)
		g3.ns.Run(5*time.Second, "busybox", "ping", "-c", "2", "-W", "1", "-I", g1.ip, g2.ip)
		g3.ns.MustRun("ip", "addr", "del", g1.ip+"/32", "dev", "vk0")
		if after := counters(sw, "g3").Drops[lan.DropSpoofIP]; after <= before {
			t.Errorf("spoof-ip drops on g3: %d → %d, want more", before, after)
		}
		g1mac := strings.Fields(g1.ns.MustRun("cat", "/sys/class/net/vk0/address"))[0]
		if out, err := g2.ns.Run(10*time.Second, "busybox", "ping", "-c", "1", "-W", "2", g1.ip); err != nil {
			t.Errorf("g2 ping g1 after spoofing: %v\n%s", err, out)
		}
		neigh := g2.ns.MustRun("ip", "neigh", "show", g1.ip)
		if !strings.Contains(neigh, g1mac) {
			t.Errorf("g2's neighbour entry for g1 = %q, want %s", neigh, g1mac)
		}
		// g3 takes g2's MAC: dropped as spoof-mac.
		before = counters(sw, "g3").Drops[lan.DropSpoofMAC]
		g3.ns.MustRun("ip", "link", "set", "vk0", "address", "02:00:00:00:00:22")
		g3.ns.Run(5*time.Second, "busybox", "ping", "-c", "2", "-W", "1", g1.ip)
		g3mac := counters(sw, "g3").MAC
		g3.ns.MustRun("ip", "link", "set", "vk0", "address", g3mac)
		if after := counters(sw, "g3").Drops[lan.DropSpoofMAC]; after <= before {
			t.Errorf("spoof-mac drops on g3: %d → %d, want more", before, after)
		}
		if out, err := g2.ns.Run(10*time.Second, "busybox", "ping", "-c", "1", "-W", "2", g1.ip); err != nil {
			t.Errorf("g2 ping g1 after MAC spoofing: %v\n%s", err, out)
		}
	})

	t.Run("Abuse", func(t *testing.T) {
		// A hostile peer on its own port: garbage, floods and a giant length.
		path := filepath.Join(sock, "bad.sock")
		if _, err := sw.ListenPort(path, lan.Lease{Name: "bad"}); err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		rng := rand.New(rand.NewPCG(1, 2))
		w := frame.NewWriter(c)
		mac := frame.MAC{0x02, 0xba, 0xd0, 0, 0, 1}
		for i := 0; i < 20000; i++ {
			f := make([]byte, frame.MinLen+rng.IntN(1500))
			for j := range f {
				f[j] = byte(rng.Uint32())
			}
			if i%2 == 0 { // half of them pass the MAC check and reach the parsers
				frame.PutEth(f, frame.Broadcast, mac, []uint16{frame.TypeIPv4, frame.TypeARP}[i%4/2])
			}
			if err := w.Write(f); err != nil {
				t.Fatalf("write garbage frame %d: %v", i, err)
			}
		}
		var hdr [4]byte
		binary.BigEndian.PutUint32(hdr[:], 0xffffffff)
		c.Write(hdr[:])
		lantest.WaitFor(t, 10*time.Second, "bad-length drop", func() error {
			if counters(sw, "bad").Drops[lan.DropBadLength] == 0 {
				return fmt.Errorf("counters %+v", counters(sw, "bad"))
			}
			return nil
		})
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.Copy(io.Discard, c); err != nil {
			t.Errorf("the switch did not close the connection after a giant length: %v", err)
		}
		sw.RemovePort("bad")
		if out, err := g1.ns.Run(10*time.Second, "busybox", "ping", "-c", "2", "-W", "2", g2.ip); err != nil {
			t.Errorf("after abuse, g1 ping g2: %v\n%s", err, out)
		}
		if out, err := g1.ns.Run(10*time.Second, "curl", "-sS", "-m", "5", "http://"+srvIP+"/hello.txt"); err != nil {
			t.Errorf("after abuse, egress: %v %q", err, out)
		}
	})

	t.Run("Reconnect", func(t *testing.T) {
		// The host side goes away and comes back: the agent reconnects and traffic resumes.
		path := filepath.Join(sock, "g2.sock")
		c2 := counters(sw, "g2")
		sw.RemovePort("g2")
		os.Remove(path)
		time.Sleep(300 * time.Millisecond)
		if _, err := sw.ListenPort(path, lan.Lease{Name: "g2", MAC: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x22}, IP: netip.MustParseAddr(g2.ip)}); err != nil {
			t.Fatal(err)
		}
		lantest.WaitFor(t, 15*time.Second, "g2 back", func() error {
			_, err := g1.ns.Run(3*time.Second, "busybox", "ping", "-c", "1", "-W", "1", g2.ip)
			return err
		})
		if c := counters(sw, "g2"); c.Connects != 1 || !c.Connected {
			t.Errorf("new g2 port counters %+v (old %+v)", c, c2)
		}
	})

	t.Run("Counters", func(t *testing.T) {
		cs := sw.Counters()
		if len(cs) != 3 {
			t.Fatalf("Counters() has %d ports, want 3: %+v", len(cs), cs)
		}
		for _, c := range cs {
			if c.RxFrames == 0 || c.TxFrames == 0 || c.RxBytes == 0 || c.TxBytes == 0 || !c.Connected {
				t.Errorf("port %s: %+v", c.Name, c)
			}
		}
		var b strings.Builder
		sw.WriteMetrics(&b)
		if !strings.Contains(b.String(), `virtkit_switch_rx_frames_total{port="g1"}`) || !strings.Contains(b.String(), `reason="spoof-ip"`) {
			t.Errorf("metrics:\n%s", b.String())
		}
	})
}

func counters(sw *lan.Switch, name string) lan.PortCounters {
	p, ok := sw.Port(name)
	if !ok {
		return lan.PortCounters{}
	}
	return p.Counters()
}

// TestJumbo runs the LAN at the largest MTU: DHCP hands it out, and 60 KB datagrams and bulk TCP
// cross between guests and through the gateway.
func TestJumbo(t *testing.T) {
	cmdtest.RequireRoot(t)
	agentBin := cmdtest.Binary(t, "virtkit-agent")
	cmdtest.Tool(t, "busybox")
	sw, err := lan.New(lan.Config{Subnet: netip.MustParsePrefix("10.89.0.0/24"), MTU: frame.MaxMTU,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sw.Close() })
	sock := t.TempDir()
	var guests []*guest
	var ports []*lan.Port
	for i, offload := range []bool{true, false, true} {
		name := fmt.Sprintf("j%d", i)
		path := filepath.Join(sock, name+".sock")
		p, err := sw.ListenPort(path, lan.Lease{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		ports = append(ports, p)
		ns := lantest.NewNetns(t, name)
		args := []string{agentBin, "net", "--connect", "unix://" + path, "--resolv-conf", ""}
		if !offload {
			args = append(args, "--no-offload")
		}
		g := &guest{ns: ns, agent: ns.Start(args...), name: name, ip: p.IP().String()}
		lantest.WaitFor(t, 15*time.Second, name+" lease", func() error {
			out, _ := ns.Run(5*time.Second, "ip", "-o", "link", "show", "vk0")
			if !strings.Contains(out, "mtu 65520") {
				return fmt.Errorf("vk0: %q (agent: %q)", out, g.agent.Output())
			}
			return nil
		})
		guests = append(guests, g)
	}
	gw, _ := sw.Gateway()
	for _, g := range guests {
		for _, dst := range []string{gw.String(), guests[0].ip, guests[1].ip} {
			if dst == g.ip {
				continue
			}
			if out, err := g.ns.Run(10*time.Second, "busybox", "ping", "-c", "2", "-W", "2", "-s", "60000", dst); err != nil {
				t.Errorf("%s: ping -s 60000 %s: %v\n%s", g.name, dst, err, out)
			}
		}
	}
	// Bulk TCP between the guests, both ways, with and without offload on either side.
	www := t.TempDir()
	big := make([]byte, 8<<20)
	for i := range big {
		big[i] = byte(i * 7)
	}
	os.WriteFile(filepath.Join(www, "big"), big, 0o644)
	for _, g := range guests {
		g.ns.Start("busybox", "httpd", "-f", "-p", "8000", "-h", www)
	}
	// plain ← offload, offload ← plain, offload ← offload (partial checksums end to end).
	for _, pair := range [][2]int{{0, 1}, {1, 0}, {0, 2}} {
		g, peer := guests[pair[0]], guests[pair[1]]
		lantest.WaitFor(t, 15*time.Second, peer.name+" fetches from "+g.name, func() error {
			out, err := peer.ns.Run(10*time.Second, "sh", "-c", "busybox wget -q -O - http://"+g.ip+":8000/big | md5sum")
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			if !strings.HasPrefix(out, md5hex(big)) {
				return fmt.Errorf("md5 %q, want %s", out, md5hex(big))
			}
			return nil
		})
	}
	// The offloading relay negotiated partial checksums and sent its bulk that way; the switch
	// completed them for the plain relay, which never saw a partial frame.
	if c := ports[0].Counters(); c.RxPartial == 0 {
		t.Errorf("offloading port counters %+v: no partial-checksum frames received", c)
	}
	if c := ports[1].Counters(); c.TxCompleted == 0 || c.TxPartial != 0 || c.RxPartial != 0 {
		t.Errorf("plain port counters %+v: want completed checksums and no partial frames", c)
	}
	// Between two offloading relays the frames stay partial: the receiving relay hands them to
	// its tap as NEEDS_CSUM, and the md5 above says the guest got every byte right.
	if c := ports[2].Counters(); c.TxPartial == 0 || c.TxCompleted != 0 {
		t.Errorf("second offloading port counters %+v: want partial frames passed through", c)
	}
}

func md5hex(b []byte) string { s := md5.Sum(b); return hex.EncodeToString(s[:]) }

// TestFlowLimit: with MaxFlows open, further egress connections are refused at once, and the
// limit frees up when flows end.
func TestFlowLimit(t *testing.T) {
	cmdtest.RequireRoot(t)
	agentBin := cmdtest.Binary(t, "virtkit-agent")
	cmdtest.Tool(t, "curl")
	hold := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			select {
			case <-hold:
			case <-r.Context().Done():
			}
		}
		io.WriteString(w, "ok\n")
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(hold) })
	port := srv.Listener.Addr().(*net.TCPAddr).Port
	sw, err := lan.New(lan.Config{Subnet: netip.MustParsePrefix("10.91.0.0/24"), AllowHostLoopback: true, MaxFlows: 2, UDPTimeout: time.Second,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sw.Close() })
	path := filepath.Join(t.TempDir(), "f.sock")
	p, err := sw.ListenPort(path, lan.Lease{Name: "f"})
	if err != nil {
		t.Fatal(err)
	}
	ns := lantest.NewNetns(t, "fl")
	ns.Start(agentBin, "net", "--connect", "unix://"+path, "--resolv-conf", "")
	lantest.WaitFor(t, 15*time.Second, "lease", func() error {
		out, _ := ns.Run(5*time.Second, "ip", "-4", "-o", "addr", "show", "dev", "vk0")
		if !strings.Contains(out, p.IP().String()) {
			return fmt.Errorf("%q", out)
		}
		return nil
	})
	url := fmt.Sprintf("http://10.91.0.1:%d/", port)
	for i := 0; i < 2; i++ {
		ns.Start("curl", "-sS", "-m", "60", url+"hold")
	}
	lantest.WaitFor(t, 15*time.Second, "two held flows", func() error {
		if g := sw.GatewayCounters(); g.Flows != 2 {
			return fmt.Errorf("%+v", g)
		}
		return nil
	})
	if out, err := ns.Run(10*time.Second, "curl", "-sS", "-m", "5", url); err == nil {
		t.Errorf("third flow accepted: %q", out)
	}
	if g := sw.GatewayCounters(); g.FlowLimitRefusals == 0 {
		t.Errorf("gateway counters %+v, want a flow-limit refusal", g)
	}
	hold <- struct{}{}
	hold <- struct{}{}
	lantest.WaitFor(t, 15*time.Second, "a flow after the held ones ended", func() error {
		out, err := ns.Run(10*time.Second, "curl", "-sS", "-m", "5", url)
		if err != nil || out != "ok\n" {
			return fmt.Errorf("%v %q", err, out)
		}
		return nil
	})

	// A UDP flow (an echo on the host's loopback) closes after UDPTimeout of silence.
	cmdtest.Tool(t, "socat")
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	lantest.WaitFor(t, 15*time.Second, "TCP flows closed", func() error {
		if g := sw.GatewayCounters(); g.Flows != 0 {
			return fmt.Errorf("%+v", g)
		}
		return nil
	})
	udpPort := pc.LocalAddr().(*net.UDPAddr).Port
	out, err := ns.Run(10*time.Second, "sh", "-c", fmt.Sprintf("echo udp-echo | socat -t 2 - UDP4:10.91.0.1:%d", udpPort))
	if err != nil || out != "udp-echo\n" {
		t.Fatalf("udp echo through the gateway: %v %q", err, out)
	}
	lantest.WaitFor(t, 10*time.Second, "idle UDP flow closed", func() error {
		if g := sw.GatewayCounters(); g.Flows != 0 {
			return fmt.Errorf("%+v", g)
		}
		return nil
	})
}

// TestEgressBulk: a guest uploads 48 MiB to a server on the host's loopback that stalls before
// reading (the host socket fills, so the gateway must hold back the guest with its window) and
// then reads in small pieces; every byte arrives in order, and after the guest's half-close the
// server's answer still reaches it. The other way, 48 MiB sent in pieces of every size reach
// a guest that reads at once and one that stops reading for two seconds. Offloaded and plain
// relays both.
func TestEgressBulk(t *testing.T) {
	cmdtest.RequireRoot(t)
	agentBin := cmdtest.Binary(t, "virtkit-agent")
	cmdtest.Tool(t, "socat")
	data := make([]byte, 48<<20)
	for i := range data {
		data[i] = byte(i*131 + i>>13)
	}
	src := filepath.Join(t.TempDir(), "upload")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	want := md5hex(data)
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				time.Sleep(500 * time.Millisecond) // let the host socket fill up
				h := md5.New()
				buf := make([]byte, 1500)
				for {
					n, err := c.Read(buf)
					h.Write(buf[:n])
					if err != nil {
						break
					}
				}
				io.WriteString(c, hex.EncodeToString(h.Sum(nil))+"\n")
			}()
		}
	}()
	port := l.Addr().(*net.TCPAddr).Port
	// And a server that sends data, for the other direction.
	dl, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dl.Close() })
	go func() {
		for {
			c, err := dl.Accept()
			if err != nil {
				return
			}
			go func() {
				// Pieces of every size, some after a pause, so the switch sees the host
				// socket with a little, a lot and nothing to read.
				defer c.Close()
				for s, i := data, 0; len(s) > 0; i++ {
					n := min(len(s), 1+(i*7919)%300000)
					if _, err := c.Write(s[:n]); err != nil {
						return
					}
					s = s[n:]
					if i%50 == 0 {
						time.Sleep(time.Millisecond)
					}
				}
			}()
		}
	}()
	dlPort := dl.Addr().(*net.TCPAddr).Port
	sw, err := lan.New(lan.Config{Subnet: netip.MustParsePrefix("10.92.0.0/24"), AllowHostLoopback: true,
		Logger: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sw.Close() })
	for i, offload := range []bool{true, false} {
		name := fmt.Sprintf("eb%d", i)
		path := filepath.Join(t.TempDir(), name+".sock")
		p, err := sw.ListenPort(path, lan.Lease{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		ns := lantest.NewNetns(t, name)
		args := []string{agentBin, "net", "--connect", "unix://" + path, "--resolv-conf", ""}
		if !offload {
			args = append(args, "--no-offload")
		}
		ns.Start(args...)
		lantest.WaitFor(t, 15*time.Second, name+" lease", func() error {
			out, _ := ns.Run(5*time.Second, "ip", "-4", "-o", "addr", "show", "dev", "vk0")
			if !strings.Contains(out, p.IP().String()) {
				return fmt.Errorf("%q", out)
			}
			return nil
		})
		// socat sends the file, half-closes, and prints what the server answers.
		out, err := ns.Run(60*time.Second, "socat", "-t", "30", "FILE:"+src+",rdonly!!STDOUT", fmt.Sprintf("TCP:10.92.0.1:%d", port))
		if err != nil || strings.TrimSpace(out) != want {
			t.Errorf("%s (offload %v): server saw md5 %q (%v), want %s", name, offload, out, err, want)
		}
		out, err = ns.Run(60*time.Second, "sh", "-c", fmt.Sprintf("socat -u TCP:10.92.0.1:%d STDOUT | md5sum", dlPort))
		if err != nil || !strings.HasPrefix(out, want) {
			t.Errorf("%s (offload %v): downloaded md5 %q (%v), want %s", name, offload, out, err, want)
		}
		// A guest that stops reading for a while: the window closes, the switch waits for it.
		out, err = ns.Run(60*time.Second, "sh", "-c", fmt.Sprintf("socat -u TCP:10.92.0.1:%d STDOUT | (sleep 2; md5sum)", dlPort))
		if err != nil || !strings.HasPrefix(out, want) {
			t.Errorf("%s (offload %v): slow download md5 %q (%v), want %s", name, offload, out, err, want)
		}
		c := p.Counters()
		if offload && (c.RxPartial == 0 || c.TxPartial == 0 || c.TxCompleted != 0) {
			t.Errorf("%s: counters %+v: want partial checksums both ways", name, c)
		}
		if !offload && (c.RxPartial != 0 || c.TxPartial != 0 || c.TxCompleted == 0) {
			t.Errorf("%s: counters %+v: want checksums completed by the switch", name, c)
		}
	}
}
