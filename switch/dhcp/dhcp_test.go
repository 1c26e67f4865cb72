package dhcp

import (
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/virtkit/virtkit/switch/frame"
)

var (
	mac    = frame.MAC{2, 0, 0, 0, 0, 9}
	server = netip.MustParseAddr("10.77.0.1")
	lease  = Lease{
		IP: netip.MustParsePrefix("10.77.0.9/24"), Router: server, DNS: []netip.Addr{server},
		Domain: "lan", Hostname: "vm9", MTU: 65520, Duration: time.Hour,
	}
)

func TestExchange(t *testing.T) {
	disc := NewDiscover(mac, 42, "vm9")
	f := ClientFrame(disc)
	got, ip, ok, err := ParseFrame(f, ServerPort)
	if !ok || err != nil {
		t.Fatalf("ParseFrame(discover): ok %v err %v", ok, err)
	}
	if !ip.Src.IsUnspecified() || got.Type() != Discover || got.XID != 42 || got.CHAddr != mac {
		t.Fatalf("discover: %+v", got)
	}
	offer := Reply(got, lease, server)
	if offer == nil || offer.Type() != Offer || offer.YIAddr != lease.IP.Addr() {
		t.Fatalf("offer: %+v", offer)
	}
	offer, err = Parse(offer.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	req, _ := Parse(NewRequest(offer, mac, "vm9").Marshal())
	ack := Reply(req, lease, server)
	if ack == nil || ack.Type() != Ack {
		t.Fatalf("ack: %+v", ack)
	}
	ack, _ = Parse(ack.Marshal())
	l, err := LeaseFrom(ack)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(l, lease) {
		t.Errorf("lease round trip:\n got %+v\nwant %+v", l, lease)
	}
	// Asking for another address is refused.
	req.Options[OptRequestedIP] = netip.MustParseAddr("10.77.0.50").AsSlice()
	if nak := Reply(req, lease, server); nak == nil || nak.Type() != Nak {
		t.Errorf("request for a foreign address: %+v", nak)
	}
	// A request for another server is ignored.
	req.Options[OptServerID] = netip.MustParseAddr("10.77.0.254").AsSlice()
	if r := Reply(req, lease, server); r != nil {
		t.Errorf("request for another server answered: %+v", r)
	}
}

func TestParseErrors(t *testing.T) {
	good := NewDiscover(mac, 1, "").Marshal()
	bad := append([]byte(nil), good...)
	bad[240] = OptHostname
	bad[241] = 200 // option runs past the end
	for name, b := range map[string][]byte{"short": good[:100], "cookie": append(append([]byte(nil), good[:236]...), 1, 2, 3, 4), "truncated option": bad[:250]} {
		if _, err := Parse(b); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}

func TestSearchList(t *testing.T) {
	got, err := DecodeSearch(encodeSearch([]string{"lan", "example.com"}))
	if err != nil || !reflect.DeepEqual(got, []string{"lan", "example.com"}) {
		t.Errorf("%q %v", got, err)
	}
}

// FuzzParse: arbitrary messages parse or fail cleanly, and what parses survives a round trip.
func FuzzParse(f *testing.F) {
	f.Add(NewDiscover(mac, 7, "host").Marshal())
	off := Reply(NewDiscover(mac, 7, ""), lease, server).Marshal()
	f.Add(off)
	f.Add(make([]byte, 240))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Parse(b)
		if err != nil {
			return
		}
		m2, err := Parse(m.Marshal())
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if m2.XID != m.XID || m2.CHAddr != m.CHAddr || len(m2.Options) != len(m.Options) {
			t.Fatalf("round trip changed the message")
		}
		Reply(m, lease, server)
		LeaseFrom(m)
		if v, ok := m.Options[OptSearch]; ok {
			DecodeSearch(v)
		}
	})
}

// FuzzParseFrame feeds whole Ethernet frames, as the switch does.
func FuzzParseFrame(f *testing.F) {
	f.Add(ClientFrame(NewDiscover(mac, 3, "x")))
	f.Add(make([]byte, 60))
	f.Fuzz(func(t *testing.T, b []byte) {
		ParseFrame(b, ServerPort)
		ParseFrame(b, ClientPort)
	})
}
