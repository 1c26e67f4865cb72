package launcher

import (
	"fmt"
	"net/netip"
	"sync"

	"github.com/virtkit/virtkit/switch/lan"
)

// LANs are the userspace networks VMs join: one switch (with its own gateway, DHCP, DNS and
// egress) per LAN name, made on first use and closed when its last VM leaves. VMs on different
// LANs cannot reach each other: each CI job gets a LAN of its own, a fleet shares one.
// LANs is safe for concurrent use.
type LANs struct {
	base lan.Config

	mu   sync.Mutex
	lans map[string]*lanEntry
}

type lanEntry struct {
	sw     *lan.Switch
	vms    map[string]string // VM → its port (host) name on this LAN
	subnet netip.Prefix
	// explicit: the subnet was asked for (a fleet's), not the base default that many LANs reuse.
	explicit bool
}

// Member is how a VM joins a LAN.
type Member struct {
	// VM is the VM's name (unique on the host).
	VM string
	// Host is the VM's name on the LAN: its port, DNS name (<host>.lan) and DHCP host name;
	// default VM. Unique per LAN, so VMs of different LANs may share it.
	Host string
	// Socket is the unix socket the switch serves the VM's port on.
	Socket string
	// Subnet, when valid, is the subnet the LAN must have: a new LAN is made with it, an existing
	// LAN with another subnet refuses the VM. Subnets given this way may not overlap each other;
	// LANs on the base (default) subnet are separate networks that reuse one range.
	Subnet netip.Prefix
}

// NewLANs returns a registry whose switches start from base (subnet, policy, logger).
func NewLANs(base lan.Config) *LANs { return &LANs{base: base, lans: map[string]*lanEntry{}} }

// Attach makes VM vm a port of LAN name, served on the unix socket path (the VM's hybrid-vsock
// listener for port 1025), and returns the address its DHCP lease will carry.
func (n *LANs) Attach(name, vm, socket string) (netip.Addr, error) {
	return n.Join(name, Member{VM: vm, Socket: socket})
}

// Join makes m.VM a port of LAN name (made on first use) and returns the address its DHCP lease
// will carry.
func (n *LANs) Join(name string, m Member) (netip.Addr, error) {
	if m.Host == "" {
		m.Host = m.VM
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	e := n.lans[name]
	if e != nil && m.Subnet.IsValid() && m.Subnet.Masked() != e.subnet {
		return netip.Addr{}, fmt.Errorf("launcher: lan %s runs on subnet %s, not %s (stop its VMs to change it)", name, e.subnet, m.Subnet)
	}
	if e == nil {
		cfg := n.base
		if m.Subnet.IsValid() {
			cfg.Subnet, cfg.Gateway = m.Subnet.Masked(), netip.Addr{}
			for other, o := range n.lans {
				if o.explicit && o.subnet.Overlaps(cfg.Subnet) {
					return netip.Addr{}, fmt.Errorf("launcher: lan %s: subnet %s overlaps lan %s's %s", name, cfg.Subnet, other, o.subnet)
				}
			}
		}
		cfg.Logger = cfg.Logger.With().Str("lan", name).Logger()
		sw, err := lan.New(cfg)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("launcher: lan %s: %w", name, err)
		}
		e = &lanEntry{sw: sw, vms: map[string]string{}, subnet: sw.Subnet(), explicit: m.Subnet.IsValid()}
		n.lans[name] = e
	}
	p, err := e.sw.ListenPort(m.Socket, lan.Lease{Name: m.Host})
	if err != nil {
		if len(e.vms) == 0 {
			e.sw.Close()
			delete(n.lans, name)
		}
		return netip.Addr{}, fmt.Errorf("launcher: lan %s: %w", name, err)
	}
	e.vms[m.VM] = m.Host
	return p.IP(), nil
}

// Detach removes vm from LAN name; the LAN's switch closes when it was the last VM.
func (n *LANs) Detach(name, vm string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e := n.lans[name]
	if e == nil {
		return
	}
	if host, ok := e.vms[vm]; ok {
		e.sw.RemovePort(host)
		delete(e.vms, vm)
	}
	if len(e.vms) == 0 {
		e.sw.Close()
		delete(n.lans, name)
	}
}

// Switch returns LAN name's switch, if it exists (for forwards, DNS entries and counters).
func (n *LANs) Switch(name string) (*lan.Switch, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e := n.lans[name]
	if e == nil {
		return nil, false
	}
	return e.sw, true
}

// Counters returns every LAN's port counters.
func (n *LANs) Counters() map[string][]lan.PortCounters {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := map[string][]lan.PortCounters{}
	for name, e := range n.lans {
		out[name] = e.sw.Counters()
	}
	return out
}

// Close closes every switch.
func (n *LANs) Close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for name, e := range n.lans {
		e.sw.Close()
		delete(n.lans, name)
	}
}
