package launcher

import "net/netip"

// SetLANHost adds name → ip to LAN lan's DNS (a CI service alias), if the LAN exists and the
// launcher has networking. An invalid ip removes the name.
func (l *Launcher) SetLANHost(lan, name, ip string) {
	if l.cfg.LANs == nil {
		return
	}
	sw, ok := l.cfg.LANs.Switch(lan)
	if !ok {
		return
	}
	a, _ := netip.ParseAddr(ip)
	sw.SetHost(name, a)
}
