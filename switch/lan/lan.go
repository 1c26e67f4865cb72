// Package lan is virtkit's userspace LAN: an L2 switch whose ports are stream connections carrying
// length-prefixed Ethernet frames (package frame), and a gateway on gVisor's netstack attached to
// it as one more port. The gateway answers ARP, hands out static DHCP leases (one per port), serves
// DNS for `<name>.lan` and forwards the rest to the host's resolvers, and re-originates guest TCP
// and UDP flows (and ICMP echo where unprivileged ping sockets allow) with ordinary host sockets,
// so no tap, bridge, root or CAP_NET_ADMIN is needed on the host. Host→guest TCP forwards are
// served from host listeners.
//
// Policy is secure by default: host loopback (and the host's own addresses), link-local
// 169.254.0.0/16 and anything in Config.Deny are unreachable from guests unless
// Config.AllowHostLoopback or Config.Allow says otherwise, and every frame a port sends is checked
// against its lease (MAC and IPv4 address), so a guest can neither spoof another port nor the
// gateway.
//
// Concurrency: a Switch is safe for concurrent use. It owns one reader and one writer goroutine
// per connected port, one goroutine per host listener, and the netstack's goroutines; Close stops
// them all and waits for them. Counters are atomics and may be read at any time.
package lan

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/virtkit/virtkit/switch/dns"
	"github.com/virtkit/virtkit/switch/frame"
)

// Config configures a Switch. The zero value is usable: every field has a documented default.
type Config struct {
	// Subnet of the LAN; default 10.77.0.0/24.
	Subnet netip.Prefix
	// Gateway address (also the DNS server); default the first address of Subnet.
	Gateway netip.Addr
	// Domain answered by the gateway's DNS; default "lan".
	Domain string
	// MTU advertised by DHCP and used by the gateway, 576..65520; default 1500.
	MTU int
	// DNSHosts are extra names under Domain (e.g. "host" → an address).
	DNSHosts map[string]netip.Addr
	// AllowHostLoopback lets guests reach the host's loopback through the gateway address (and the
	// host's own addresses directly).
	AllowHostLoopback bool
	// Allow lists destinations reachable even if a default or Deny rule forbids them.
	Allow []netip.Prefix
	// Deny lists destinations guests may not reach (e.g. the broker's address).
	Deny []netip.Prefix
	// Forwards are host→guest port forwards opened by Start.
	Forwards []Forward
	// DNSUpstream overrides the host resolvers (default: /etc/resolv.conf).
	DNSUpstream []netip.AddrPort
	// UDPTimeout closes idle UDP flows; default 60s.
	UDPTimeout time.Duration
	// NoOffload makes the gateway send TCP in MTU-sized frames only. By default it sends
	// super-segments of up to 64 KiB as single frames (like a NIC's receive offload), which
	// virtkit's relay and Linux taps accept; set this for peers that drop frames above the MTU.
	NoOffload bool
	// MaxFlows caps the TCP connections and UDP flows the gateway re-originates at once (all
	// guests together), so that a guest cannot exhaust the host's sockets; default 16384.
	MaxFlows int
	// QueueLen is each port's transmit queue in frames; default 1024.
	QueueLen int
	// Logger receives the switch's logs.
	Logger zerolog.Logger
}

// Lease is what a port is allowed to be: a name (its DNS name and DHCP host name), its MAC and its
// IPv4 address. A zero MAC is learned from the port's first frame and then fixed; a zero IP is
// allocated from the subnet.
type Lease struct {
	Name string
	MAC  net.HardwareAddr
	IP   netip.Addr
}

// Forward is a host→guest TCP port forward: connections to Listen (host:port on the host) are
// carried to Port on the guest named Name.
type Forward struct {
	Proto  string // "tcp"
	Listen string
	Name   string
	Port   uint16
}

func (f Forward) String() string {
	return fmt.Sprintf("%s:%s=%s:%d", f.Proto, f.Listen, f.Name, f.Port)
}

// ParseForward parses "tcp:HOST:PORT=NAME:PORT" (the proto defaults to tcp).
func ParseForward(s string) (Forward, error) {
	l, r, ok := strings.Cut(s, "=")
	if !ok {
		return Forward{}, fmt.Errorf("forward %q: want tcp:HOST:PORT=NAME:PORT", s)
	}
	f := Forward{Proto: "tcp", Listen: l}
	if p, rest, ok := strings.Cut(l, ":"); ok && (p == "tcp" || p == "udp") {
		f.Proto, f.Listen = p, rest
	}
	if f.Proto != "tcp" {
		return Forward{}, fmt.Errorf("forward %q: only tcp forwards are supported", s)
	}
	if _, _, err := net.SplitHostPort(f.Listen); err != nil {
		return Forward{}, fmt.Errorf("forward %q: listen address: %w", s, err)
	}
	name, port, ok := strings.Cut(r, ":")
	n, err := strconv.ParseUint(port, 10, 16)
	if !ok || name == "" || err != nil || n == 0 {
		return Forward{}, fmt.Errorf("forward %q: want NAME:PORT after '='", s)
	}
	f.Name, f.Port = name, uint16(n)
	return f, nil
}

// Switch is the L2 switch and its gateway.
type Switch struct {
	cfg    Config
	log    zerolog.Logger
	gwMAC  frame.MAC
	policy atomic.Pointer[policy]
	dns    *dns.Server
	stack  *stack.Stack
	link   *linkEndpoint

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	ports     map[string]*Port
	listeners map[string]net.Listener // by port name
	forwards  map[string]net.Listener // by listen address
	closed    bool
	// macs maps learned MACs to ports; replaced wholesale (copy on write) so the data path reads it
	// without locking.
	macs atomic.Pointer[map[frame.MAC]*Port]

	icmp        icmpState
	gwDrops     atomic.Uint64 // gateway frames for unknown MACs
	policyDrops atomic.Uint64 // flows refused by policy
	flowDrops   atomic.Uint64 // flows refused because MaxFlows were open
	flows       atomic.Int64  // open egress flows
}

// ErrClosed is returned by operations on a closed Switch.
var ErrClosed = errors.New("lan: switch closed")

// New builds a Switch and starts its gateway. Call Close (or Run) to stop it.
func New(cfg Config) (*Switch, error) {
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = netip.MustParsePrefix("10.77.0.0/24")
	}
	cfg.Subnet = cfg.Subnet.Masked()
	if !cfg.Subnet.Addr().Is4() || cfg.Subnet.Bits() > 30 {
		return nil, fmt.Errorf("lan: subnet %s: want an IPv4 prefix of /30 or larger", cfg.Subnet)
	}
	if !cfg.Gateway.IsValid() {
		cfg.Gateway = cfg.Subnet.Addr().Next()
	}
	if !cfg.Subnet.Contains(cfg.Gateway) {
		return nil, fmt.Errorf("lan: gateway %s is outside subnet %s", cfg.Gateway, cfg.Subnet)
	}
	if cfg.Domain == "" {
		cfg.Domain = "lan"
	}
	if cfg.MTU == 0 {
		cfg.MTU = 1500
	}
	if cfg.MTU < 576 || cfg.MTU > frame.MaxMTU {
		return nil, fmt.Errorf("lan: mtu %d: want 576..%d", cfg.MTU, frame.MaxMTU)
	}
	if cfg.UDPTimeout == 0 {
		cfg.UDPTimeout = 60 * time.Second
	}
	if cfg.MaxFlows == 0 {
		cfg.MaxFlows = 16384
	}
	if cfg.QueueLen == 0 {
		cfg.QueueLen = 1024
	}
	s := &Switch{
		cfg:       cfg,
		log:       cfg.Logger.With().Str("component", "switch").Logger(),
		ports:     map[string]*Port{},
		listeners: map[string]net.Listener{},
		forwards:  map[string]net.Listener{},
	}
	s.macs.Store(&map[frame.MAC]*Port{})
	s.gwMAC = frame.MAC{0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd} // fixed, locally administered: stable across restarts
	s.policy.Store(newPolicy(cfg))
	d, err := dns.New(dns.Config{Domain: cfg.Domain, Upstream: cfg.DNSUpstream, Forbidden: func(a netip.Addr) bool { return !s.policy.Load().permit(a) }})
	if err != nil {
		return nil, fmt.Errorf("lan: %w", err)
	}
	s.dns = d
	for n, ip := range cfg.DNSHosts {
		d.SetHost(n, ip)
	}
	d.SetHost("gateway", cfg.Gateway)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if err := s.startGateway(); err != nil {
		s.cancel()
		return nil, err
	}
	for _, f := range cfg.Forwards {
		if err := s.AddForward(f); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// Run serves until ctx ends, then closes the switch.
func (s *Switch) Run(ctx context.Context) error {
	select {
	case <-ctx.Done():
	case <-s.ctx.Done():
	}
	s.Close()
	return nil
}

// Close stops every port, listener and forward and the gateway, and waits for their goroutines.
func (s *Switch) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for _, l := range s.listeners {
		l.Close()
	}
	for _, l := range s.forwards {
		l.Close()
	}
	ports := make([]*Port, 0, len(s.ports))
	for _, p := range s.ports {
		ports = append(ports, p)
	}
	s.mu.Unlock()
	s.cancel()
	for _, p := range ports {
		p.close()
	}
	s.wg.Wait()
	s.stack.Close()
	s.stack.Wait()
	return nil
}

// SetPolicy replaces the egress policy (Config.AllowHostLoopback, Allow and Deny) for new flows;
// established flows are not cut.
func (s *Switch) SetPolicy(allowHostLoopback bool, allow, deny []netip.Prefix) {
	cfg := s.cfg
	cfg.AllowHostLoopback, cfg.Allow, cfg.Deny = allowHostLoopback, allow, deny
	s.policy.Store(newPolicy(cfg))
}

// Gateway returns the gateway's address and MAC.
func (s *Switch) Gateway() (netip.Addr, net.HardwareAddr) { return s.cfg.Gateway, s.gwMAC.HW() }

// Subnet is the LAN's subnet (Config.Subnet with its default applied).
func (s *Switch) Subnet() netip.Prefix { return s.cfg.Subnet }

// SetHost adds, changes or (with an invalid ip) removes a DNS name under the LAN domain.
func (s *Switch) SetHost(name string, ip netip.Addr) { s.dns.SetHost(name, ip) }

// ListenPort listens on the unix socket path (replacing a stale socket file nobody answers on)
// and serves each connection as the port for lease;
// a new connection replaces the previous one (the guest relay reconnects after a restart). The
// port keeps its lease and counters until RemovePort.
func (s *Switch) ListenPort(path string, lease Lease) (*Port, error) {
	p, err := s.newPort(lease)
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil && errors.Is(err, syscall.EADDRINUSE) {
		// A socket file left by a switch that died: replace it unless someone still answers.
		if c, derr := net.DialTimeout("unix", path, time.Second); derr == nil {
			c.Close()
		} else if os.Remove(path) == nil {
			l, err = net.Listen("unix", path)
		}
	}
	if err != nil {
		s.RemovePort(p.name)
		return nil, fmt.Errorf("lan: listen port %s on %s: %w", p.name, path, err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return nil, ErrClosed
	}
	s.listeners[p.name] = l
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			p.attach(c)
		}
	}()
	s.log.Info().Str("port", p.name).Str("path", path).Str("ip", p.ip.String()).Msg("port listening")
	return p, nil
}

// AddPort serves conn as a port for lease. The port is removed when conn ends.
func (s *Switch) AddPort(conn net.Conn, lease Lease) (*Port, error) {
	p, err := s.newPort(lease)
	if err != nil {
		conn.Close()
		return nil, err
	}
	p.ephemeral = true
	p.attach(conn)
	return p, nil
}

// RemovePort disconnects and forgets the port called name.
func (s *Switch) RemovePort(name string) {
	s.mu.Lock()
	p := s.ports[name]
	delete(s.ports, name)
	l := s.listeners[name]
	delete(s.listeners, name)
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
	if p == nil {
		return
	}
	p.close()
	s.forgetMACs(p)
	s.dns.SetHost(name, netip.Addr{})
}

// Port returns the port called name.
func (s *Switch) Port(name string) (*Port, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.ports[name]
	return p, ok
}

// Counters returns every port's counters, sorted by name.
func (s *Switch) Counters() []PortCounters {
	s.mu.Lock()
	ports := make([]*Port, 0, len(s.ports))
	for _, p := range s.ports {
		ports = append(ports, p)
	}
	s.mu.Unlock()
	out := make([]PortCounters, 0, len(ports))
	for _, p := range ports {
		out = append(out, p.Counters())
	}
	sortCounters(out)
	return out
}

func (s *Switch) newPort(lease Lease) (*Port, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	if lease.Name == "" {
		return nil, fmt.Errorf("lan: add port: a lease needs a name")
	}
	if !validName(lease.Name) {
		return nil, fmt.Errorf("lan: add port %q: names are DNS labels (a-z, 0-9, '-')", lease.Name)
	}
	if _, ok := s.ports[lease.Name]; ok {
		return nil, fmt.Errorf("lan: add port %q: name in use", lease.Name)
	}
	var mac frame.MAC
	if len(lease.MAC) != 0 {
		m, ok := frame.MACFrom(lease.MAC)
		if !ok || m.IsMulticast() || m.IsZero() {
			return nil, fmt.Errorf("lan: add port %q: MAC %s is not a unicast Ethernet address", lease.Name, lease.MAC)
		}
		mac = m
		for _, o := range s.ports {
			if o.MAC() == mac {
				return nil, fmt.Errorf("lan: add port %q: MAC %s belongs to port %s", lease.Name, mac, o.name)
			}
		}
		if mac == s.gwMAC {
			return nil, fmt.Errorf("lan: add port %q: MAC %s is the gateway's", lease.Name, mac)
		}
	}
	ip := lease.IP
	if ip.IsValid() {
		ip = ip.Unmap()
		if !s.usable(ip) {
			return nil, fmt.Errorf("lan: add port %q: address %s is not a host address of %s other than the gateway", lease.Name, ip, s.cfg.Subnet)
		}
		for _, o := range s.ports {
			if o.ip == ip {
				return nil, fmt.Errorf("lan: add port %q: address %s belongs to port %s", lease.Name, ip, o.name)
			}
		}
	} else {
		for a := s.cfg.Subnet.Addr().Next(); s.cfg.Subnet.Contains(a); a = a.Next() {
			if !s.usable(a) {
				continue
			}
			taken := false
			for _, o := range s.ports {
				if o.ip == a {
					taken = true
					break
				}
			}
			if !taken {
				ip = a
				break
			}
		}
		if !ip.IsValid() {
			return nil, fmt.Errorf("lan: add port %q: subnet %s is full", lease.Name, s.cfg.Subnet)
		}
	}
	p := newPort(s, lease.Name, mac, ip)
	s.ports[p.name] = p
	if !mac.IsZero() {
		s.learnLocked(p, mac)
	}
	s.dns.SetHost(p.name, ip)
	return p, nil
}

// usable reports whether a is a host address of the subnet other than the gateway.
func (s *Switch) usable(a netip.Addr) bool {
	if !s.cfg.Subnet.Contains(a) || a == s.cfg.Gateway || a == s.cfg.Subnet.Addr() {
		return false
	}
	b := a.As4()
	bits := s.cfg.Subnet.Bits()
	host := (uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])) & (1<<(32-bits) - 1)
	return host != 1<<(32-bits)-1
}

func validName(n string) bool {
	if n == "" || len(n) > 63 {
		return false
	}
	for i, c := range n {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0:
		default:
			return false
		}
	}
	return true
}

// learnLocked records mac as belonging to p (copy on write); s.mu is held.
func (s *Switch) learnLocked(p *Port, mac frame.MAC) {
	old := *s.macs.Load()
	m := make(map[frame.MAC]*Port, len(old)+1)
	for k, v := range old {
		m[k] = v
	}
	m[mac] = p
	s.macs.Store(&m)
}

func (s *Switch) forgetMACs(p *Port) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := *s.macs.Load()
	m := make(map[frame.MAC]*Port, len(old))
	for k, v := range old {
		if v != p {
			m[k] = v
		}
	}
	s.macs.Store(&m)
}

// ParseListen parses a port spec of `virtkit switch --listen`: "unix:///PATH[,name=N][,mac=M][,ip=A]".
// The name defaults to the socket file's base name (without extension).
func ParseListen(s string) (path string, l Lease, err error) {
	parts := strings.Split(s, ",")
	rest, ok := strings.CutPrefix(parts[0], "unix://")
	if !ok || rest == "" {
		return "", Lease{}, fmt.Errorf("listen %q: want unix:///PATH[,name=N,mac=M,ip=A]", s)
	}
	path = rest
	for _, kv := range parts[1:] {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return "", Lease{}, fmt.Errorf("listen %q: %q is not key=value", s, kv)
		}
		switch k {
		case "name":
			l.Name = v
		case "mac":
			if l.MAC, err = net.ParseMAC(v); err != nil || len(l.MAC) != 6 {
				return "", Lease{}, fmt.Errorf("listen %q: mac %q is not an Ethernet address", s, v)
			}
		case "ip":
			if l.IP, err = netip.ParseAddr(v); err != nil || !l.IP.Is4() {
				return "", Lease{}, fmt.Errorf("listen %q: ip %q is not an IPv4 address", s, v)
			}
		default:
			return "", Lease{}, fmt.Errorf("listen %q: unknown key %q (want name, mac or ip)", s, k)
		}
	}
	if l.Name == "" {
		base := path[strings.LastIndexByte(path, '/')+1:]
		if i := strings.IndexByte(base, '.'); i > 0 {
			base = base[:i]
		}
		l.Name = strings.ToLower(base)
	}
	if !validName(l.Name) {
		return "", Lease{}, fmt.Errorf("listen %q: name %q: want a DNS label (a-z, 0-9, '-')", s, l.Name)
	}
	return path, l, nil
}
