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
	sw  *lan.Switch
	vms map[string]bool
}

// NewLANs returns a registry whose switches start from base (subnet, policy, logger).
func NewLANs(base lan.Config) *LANs { return &LANs{base: base, lans: map[string]*lanEntry{}} }

// Attach makes VM vm a port of LAN name, served on the unix socket path (the VM's hybrid-vsock
// listener for port 1025), and returns the address its DHCP lease will carry.
func (n *LANs) Attach(name, vm, socket string) (netip.Addr, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e := n.lans[name]
	if e == nil {
		cfg := n.base
		cfg.Logger = cfg.Logger.With().Str("lan", name).Logger()
		sw, err := lan.New(cfg)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("launcher: lan %s: %w", name, err)
		}
		e = &lanEntry{sw: sw, vms: map[string]bool{}}
		n.lans[name] = e
	}
	p, err := e.sw.ListenPort(socket, lan.Lease{Name: vm})
	if err != nil {
		if len(e.vms) == 0 {
			e.sw.Close()
			delete(n.lans, name)
		}
		return netip.Addr{}, fmt.Errorf("launcher: lan %s: %w", name, err)
	}
	e.vms[vm] = true
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
	e.sw.RemovePort(vm)
	delete(e.vms, vm)
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
