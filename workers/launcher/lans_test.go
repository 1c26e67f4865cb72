package launcher

import (
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/switch/lan"
)

// Two LANs may each have a VM called "redis" on the LAN (different VM names); a LAN takes the
// subnet its first VM asks for; explicit subnets may not overlap; a LAN refuses a VM that asks for
// another subnet than the one it runs on.
func TestLANsJoin(t *testing.T) {
	dir := t.TempDir()
	n := NewLANs(lan.Config{Logger: zerolog.Nop()})
	defer n.Close()
	sock := func(s string) string { return filepath.Join(dir, s) }
	join := func(l string, m Member) netip.Addr {
		t.Helper()
		ip, err := n.Join(l, m)
		if err != nil {
			t.Fatalf("join %s %+v: %v", l, m, err)
		}
		return ip
	}
	a := join("fleet-a", Member{VM: "a-redis", Host: "redis", Socket: sock("1")})
	b := join("fleet-b", Member{VM: "b-redis", Host: "redis", Socket: sock("2"), Subnet: netip.MustParsePrefix("10.88.0.0/24")})
	if !netip.MustParsePrefix("10.77.0.0/24").Contains(a) || !netip.MustParsePrefix("10.88.0.0/24").Contains(b) {
		t.Fatalf("leases %s and %s: want one in the default subnet and one in 10.88.0.0/24", a, b)
	}
	for l, want := range map[string]netip.Addr{"fleet-a": a, "fleet-b": b} {
		sw, _ := n.Switch(l)
		if p, ok := sw.Port("redis"); !ok || p.IP() != want {
			t.Errorf("lan %s: port redis = %v, %v; want %s", l, p, ok, want)
		}
	}
	if _, err := n.Join("fleet-c", Member{VM: "c-x", Socket: sock("3"), Subnet: netip.MustParsePrefix("10.88.0.128/25")}); err == nil || !strings.Contains(err.Error(), "overlaps lan fleet-b") {
		t.Errorf("overlapping subnet: %v", err)
	}
	if _, err := n.Join("fleet-b", Member{VM: "b-web", Host: "web", Socket: sock("4"), Subnet: netip.MustParsePrefix("10.99.0.0/24")}); err == nil || !strings.Contains(err.Error(), "runs on subnet 10.88.0.0/24") {
		t.Errorf("a second subnet for one LAN: %v", err)
	}
	// The default subnet is reused by LANs that do not ask for one; it is not an overlap.
	join("fleet-d", Member{VM: "d-x", Socket: sock("5")})
	if _, err := n.Join("fleet-a", Member{VM: "a-redis2", Host: "redis", Socket: sock("6")}); err == nil {
		t.Error("a second port called redis on one LAN was accepted")
	}
	n.Detach("fleet-b", "b-redis")
	if _, ok := n.Switch("fleet-b"); ok {
		t.Error("fleet-b still exists after its last VM left")
	}
	sw, _ := n.Switch("fleet-a")
	n.Detach("fleet-a", "a-redis2") // never joined: a no-op that must not remove the other port
	if _, ok := sw.Port("redis"); !ok {
		t.Error("detaching an unknown VM removed the port redis")
	}
}
