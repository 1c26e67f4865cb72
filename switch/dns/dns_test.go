package dns

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

func query(t testing.TB, name string, typ dnsmessage.Type) []byte {
	t.Helper()
	m := dnsmessage.Message{Header: dnsmessage.Header{ID: 0x1234, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}}}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func answer(t testing.TB, s *Server, name string, typ dnsmessage.Type) dnsmessage.Message {
	t.Helper()
	b, err := s.Answer(context.Background(), query(t, name, typ))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil {
		t.Fatalf("%s: unpack: %v", name, err)
	}
	if m.ID != 0x1234 || !m.Response {
		t.Fatalf("%s: header %+v", name, m.Header)
	}
	return m
}

// upstream serves fixed A records on loopback.
func upstream(t testing.TB, records map[string][]netip.Addr) netip.AddrPort {
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
			if m.Unpack(buf[:n]) != nil {
				continue
			}
			m.Response = true
			q := m.Questions[0]
			for _, a := range records[q.Name.String()] {
				m.Answers = append(m.Answers, dnsmessage.Resource{Header: dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 9}, Body: &dnsmessage.AResource{A: a.As4()}})
			}
			b, _ := m.Pack()
			pc.WriteTo(b, from)
		}
	}()
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

func TestLocal(t *testing.T) {
	s, err := New(Config{Upstream: []netip.AddrPort{}})
	if err != nil {
		t.Fatal(err)
	}
	s.SetHost("vm1", netip.MustParseAddr("10.77.0.2"))
	s.SetHost("DB.lan", netip.MustParseAddr("10.77.0.3"))
	m := answer(t, s, "vm1.lan.", dnsmessage.TypeA)
	if len(m.Answers) != 1 || m.Answers[0].Body.(*dnsmessage.AResource).A != [4]byte{10, 77, 0, 2} || !m.Authoritative {
		t.Errorf("vm1.lan: %+v", m)
	}
	m = answer(t, s, "db.LAN.", dnsmessage.TypeA)
	if len(m.Answers) != 1 {
		t.Errorf("db.lan (case-insensitive): %+v", m)
	}
	if m = answer(t, s, "vm1.lan.", dnsmessage.TypeAAAA); m.RCode != dnsmessage.RCodeSuccess || len(m.Answers) != 0 {
		t.Errorf("vm1.lan AAAA: want NOERROR/empty, got %+v", m)
	}
	if m = answer(t, s, "nope.lan.", dnsmessage.TypeA); m.RCode != dnsmessage.RCodeNameError {
		t.Errorf("nope.lan: %v", m.RCode)
	}
	s.SetHost("vm1", netip.Addr{})
	if m = answer(t, s, "vm1.lan.", dnsmessage.TypeA); m.RCode != dnsmessage.RCodeNameError {
		t.Errorf("vm1.lan after removal: %v", m.RCode)
	}
}

func TestForwardFilters(t *testing.T) {
	up := upstream(t, map[string][]netip.Addr{
		"ok.test.":     {netip.MustParseAddr("192.0.2.1")},
		"rebind.test.": {netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("169.254.169.254")},
	})
	forbidden := func(a netip.Addr) bool { return a.IsLoopback() || a.IsLinkLocalUnicast() }
	s, err := New(Config{Upstream: []netip.AddrPort{up}, Forbidden: forbidden})
	if err != nil {
		t.Fatal(err)
	}
	if m := answer(t, s, "ok.test.", dnsmessage.TypeA); len(m.Answers) != 1 {
		t.Errorf("ok.test: %+v", m.Answers)
	}
	m := answer(t, s, "rebind.test.", dnsmessage.TypeA)
	if len(m.Answers) != 1 || m.Answers[0].Body.(*dnsmessage.AResource).A != [4]byte{192, 0, 2, 2} {
		t.Errorf("rebind.test: want only 192.0.2.2, got %+v", m.Answers)
	}
}

func TestMalformed(t *testing.T) {
	s, _ := New(Config{Upstream: []netip.AddrPort{}})
	for _, q := range [][]byte{nil, {1, 2, 3}, make([]byte, 12)} {
		if b, err := s.Answer(context.Background(), q); err == nil && q == nil {
			t.Errorf("%x answered %x", q, b)
		}
	}
}

// FuzzAnswer: any query gets an answer that parses, or an error; never a panic. Names outside the
// LAN go to an upstream that refuses at once.
func FuzzAnswer(f *testing.F) {
	f.Add(query(f, "vm1.lan.", dnsmessage.TypeA))
	f.Add(query(f, "x.example.", dnsmessage.TypeMX))
	f.Add(query(f, "lan.", dnsmessage.TypeALL))
	f.Add([]byte{0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c})
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	closed := netip.MustParseAddrPort(pc.LocalAddr().String())
	pc.Close()
	s, _ := New(Config{Upstream: []netip.AddrPort{closed}})
	s.SetHost("vm1", netip.MustParseAddr("10.77.0.2"))
	f.Fuzz(func(t *testing.T, q []byte) {
		b, err := s.Answer(context.Background(), q)
		if err != nil {
			return
		}
		var m dnsmessage.Message
		if err := m.Unpack(b); err != nil {
			t.Fatalf("answer does not parse: %v", err)
		}
	})
}

// FuzzFilter runs the answer filter over arbitrary upstream responses.
func FuzzFilter(f *testing.F) {
	m := dnsmessage.Message{Header: dnsmessage.Header{Response: true}, Answers: []dnsmessage.Resource{{
		Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("a."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET},
		Body:   &dnsmessage.AResource{A: [4]byte{127, 0, 0, 1}}}}}
	b, _ := m.Pack()
	f.Add(b)
	s, _ := New(Config{Upstream: []netip.AddrPort{}, Forbidden: func(a netip.Addr) bool { return a.IsLoopback() }})
	f.Fuzz(func(t *testing.T, resp []byte) {
		out, err := s.filter(resp)
		if err != nil {
			return
		}
		var m dnsmessage.Message
		if err := m.Unpack(out); err != nil {
			t.Fatalf("filtered answer does not parse: %v", err)
		}
		for _, r := range m.Answers {
			if a, ok := r.Body.(*dnsmessage.AResource); ok && a.A[0] == 127 {
				t.Fatalf("loopback answer survived")
			}
		}
	})
}
