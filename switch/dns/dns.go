// Package dns is the gateway's resolver: it answers names under the LAN domain (`<name>.lan`) from
// a live table and forwards every other question to the host's resolvers, removing answers that
// point into ranges the guests may not reach (so DNS cannot be used to rebind a name onto the
// host's loopback or the metadata range; the egress policy is enforced again at connect time).
//
// A Server is safe for concurrent use: Answer may run on many goroutines while SetHost updates
// the table.
package dns

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// LocalTTL is the TTL of answers under the LAN domain: short, because VMs come and go.
const LocalTTL = 5

// Server answers DNS queries.
type Server struct {
	domain    string // "lan." form, lower case
	upstream  []netip.AddrPort
	forbidden func(netip.Addr) bool
	timeout   time.Duration

	mu    sync.RWMutex
	hosts map[string]netip.Addr // "name" (no domain), lower case
}

// Config configures a Server.
type Config struct {
	// Domain is the LAN domain, default "lan".
	Domain string
	// Upstream resolvers; default the nameservers of /etc/resolv.conf.
	Upstream []netip.AddrPort
	// Forbidden reports addresses that must not appear in forwarded answers; nil allows all.
	Forbidden func(netip.Addr) bool
	// Timeout per upstream attempt, default 2s.
	Timeout time.Duration
}

// New returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.Domain == "" {
		cfg.Domain = "lan"
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 2 * time.Second
	}
	if cfg.Upstream == nil {
		up, err := ResolvConf("/etc/resolv.conf")
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		cfg.Upstream = up
	}
	return &Server{
		domain:    strings.ToLower(strings.Trim(cfg.Domain, ".")) + ".",
		upstream:  cfg.Upstream,
		forbidden: cfg.Forbidden,
		timeout:   cfg.Timeout,
		hosts:     map[string]netip.Addr{},
	}, nil
}

// SetHost maps name (with or without the LAN domain) to ip; an invalid ip removes the name.
func (s *Server) SetHost(name string, ip netip.Addr) {
	name = strings.ToLower(strings.TrimSuffix(strings.TrimSuffix(name, "."), "."+strings.TrimSuffix(s.domain, ".")))
	s.mu.Lock()
	defer s.mu.Unlock()
	if !ip.IsValid() {
		delete(s.hosts, name)
		return
	}
	s.hosts[name] = ip.Unmap()
}

// Host returns the address of a LAN name.
func (s *Server) Host(name string) (netip.Addr, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	ip, ok := s.hosts[strings.ToLower(name)]
	return ip, ok
}

// ResolvConf reads the nameserver lines of a resolv.conf.
func ResolvConf(path string) ([]netip.AddrPort, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("dns: read %s: %w", path, err)
	}
	defer f.Close()
	var out []netip.AddrPort
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "nameserver" {
			if a, err := netip.ParseAddr(strings.Split(fields[1], "%")[0]); err == nil {
				out = append(out, netip.AddrPortFrom(a, 53))
			}
		}
	}
	return out, sc.Err()
}

// ErrMalformed is returned for queries that cannot be parsed; no answer should be sent.
var ErrMalformed = errors.New("dns: malformed query")

// Answer returns the response to the query q (a DNS message as carried in UDP).
func (s *Server) Answer(ctx context.Context, q []byte) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if h.Response {
		return nil, fmt.Errorf("%w: a response, not a query", ErrMalformed)
	}
	qs, err := p.AllQuestions()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if h.OpCode != 0 || len(qs) != 1 {
		return s.reply(h, nil, dnsmessage.RCodeNotImplemented, nil)
	}
	if !wellFormed(qs[0].Name) {
		return s.reply(h, nil, dnsmessage.RCodeFormatError, nil)
	}
	name := strings.ToLower(qs[0].Name.String())
	if name == s.domain || strings.HasSuffix(name, "."+s.domain) {
		return s.local(h, qs[0], strings.TrimSuffix(strings.TrimSuffix(name, s.domain), "."))
	}
	return s.forward(ctx, h, qs, q)
}

func (s *Server) reply(h dnsmessage.Header, qs []dnsmessage.Question, rc dnsmessage.RCode, answers []dnsmessage.Resource) ([]byte, error) {
	msg := dnsmessage.Message{
		Header: dnsmessage.Header{ID: h.ID, Response: true, OpCode: h.OpCode, RecursionDesired: h.RecursionDesired,
			RecursionAvailable: true, RCode: rc},
		Questions: qs,
		Answers:   answers,
	}
	return msg.Pack()
}

func (s *Server) local(h dnsmessage.Header, q dnsmessage.Question, host string) ([]byte, error) {
	ip, ok := s.Host(host)
	if !ok {
		if host == "" { // the domain apex exists, with no records
			return s.authoritative(h, q, dnsmessage.RCodeSuccess, nil)
		}
		return s.authoritative(h, q, dnsmessage.RCodeNameError, nil)
	}
	var ans []dnsmessage.Resource
	rh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: LocalTTL}
	switch {
	case (q.Type == dnsmessage.TypeA || q.Type == dnsmessage.TypeALL) && ip.Is4():
		rh.Type = dnsmessage.TypeA
		ans = append(ans, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AResource{A: ip.As4()}})
	case (q.Type == dnsmessage.TypeAAAA || q.Type == dnsmessage.TypeALL) && ip.Is6():
		rh.Type = dnsmessage.TypeAAAA
		ans = append(ans, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AAAAResource{AAAA: ip.As16()}})
	}
	return s.authoritative(h, q, dnsmessage.RCodeSuccess, ans)
}

func (s *Server) authoritative(h dnsmessage.Header, q dnsmessage.Question, rc dnsmessage.RCode, ans []dnsmessage.Resource) ([]byte, error) {
	msg := dnsmessage.Message{
		Header: dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired,
			RecursionAvailable: true, RCode: rc},
		Questions: []dnsmessage.Question{q},
		Answers:   ans,
	}
	return msg.Pack()
}

// wellFormed reports whether a question name survives being written back: labels of 1..63 bytes
// with no dots inside (a label holding a dot would be split when answered).
func wellFormed(n dnsmessage.Name) bool {
	str := n.String()
	if str == "." {
		return true
	}
	if len(str) > 254 || !strings.HasSuffix(str, ".") {
		return false
	}
	for _, l := range strings.Split(strings.TrimSuffix(str, "."), ".") {
		if l == "" || len(l) > 63 {
			return false
		}
	}
	// The wire form must have as many labels as the dotted form.
	b, err := (&dnsmessage.Message{Questions: []dnsmessage.Question{{Name: n, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}}}).Pack()
	if err != nil {
		return false
	}
	var p dnsmessage.Parser
	if _, err := p.Start(b); err != nil {
		return false
	}
	q, err := p.Question()
	return err == nil && q.Name.String() == str
}

// forward asks the upstream resolvers in turn and filters the answer.
func (s *Server) forward(ctx context.Context, h dnsmessage.Header, qs []dnsmessage.Question, q []byte) ([]byte, error) {
	if len(s.upstream) == 0 {
		return s.viaGo(ctx, h, qs)
	}
	var lastErr error
	for _, up := range s.upstream {
		resp, err := s.exchange(ctx, up, q)
		if err != nil {
			lastErr = err
			continue
		}
		return s.filter(resp)
	}
	if lastErr != nil && ctx.Err() == nil {
		return s.reply(h, qs, dnsmessage.RCodeServerFailure, nil)
	}
	return nil, fmt.Errorf("dns: forward: %w", lastErr)
}

func (s *Server) exchange(ctx context.Context, up netip.AddrPort, q []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "udp", up.String())
	if err != nil {
		return nil, fmt.Errorf("dns: dial upstream %s: %w", up, err)
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	if _, err := c.Write(q); err != nil {
		return nil, fmt.Errorf("dns: send to %s: %w", up, err)
	}
	buf := make([]byte, 65535)
	id := uint16(q[0])<<8 | uint16(q[1])
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, fmt.Errorf("dns: read from %s: %w", up, err)
		}
		if n >= 12 && uint16(buf[0])<<8|uint16(buf[1]) == id {
			return buf[:n], nil
		}
	}
}

// filter drops A/AAAA records that point at forbidden addresses.
func (s *Server) filter(resp []byte) ([]byte, error) {
	if s.forbidden == nil {
		return resp, nil
	}
	var msg dnsmessage.Message
	if err := msg.Unpack(resp); err != nil {
		return nil, fmt.Errorf("dns: upstream answer: %w", err)
	}
	keep := func(rs []dnsmessage.Resource) ([]dnsmessage.Resource, bool) {
		out := rs[:0]
		dropped := false
		for _, r := range rs {
			var a netip.Addr
			switch b := r.Body.(type) {
			case *dnsmessage.AResource:
				a = netip.AddrFrom4(b.A)
			case *dnsmessage.AAAAResource:
				a = netip.AddrFrom16(b.AAAA).Unmap()
			}
			if a.IsValid() && s.forbidden(a) {
				dropped = true
				continue
			}
			out = append(out, r)
		}
		return out, dropped
	}
	var d1, d2 bool
	msg.Answers, d1 = keep(msg.Answers)
	msg.Additionals, d2 = keep(msg.Additionals)
	if !d1 && !d2 {
		return resp, nil
	}
	return msg.Pack()
}

// viaGo answers A/AAAA with the Go resolver when no nameserver is configured.
func (s *Server) viaGo(ctx context.Context, h dnsmessage.Header, qs []dnsmessage.Question) ([]byte, error) {
	q := qs[0]
	if q.Type != dnsmessage.TypeA && q.Type != dnsmessage.TypeAAAA {
		return s.reply(h, qs, dnsmessage.RCodeNotImplemented, nil)
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	netw := "ip4"
	if q.Type == dnsmessage.TypeAAAA {
		netw = "ip6"
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, netw, q.Name.String())
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
		return s.reply(h, qs, dnsmessage.RCodeNameError, nil)
	}
	if err != nil {
		return s.reply(h, qs, dnsmessage.RCodeServerFailure, nil)
	}
	var ans []dnsmessage.Resource
	for _, ip := range ips {
		ip = ip.Unmap()
		if s.forbidden != nil && s.forbidden(ip) {
			continue
		}
		rh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 30}
		if ip.Is4() && q.Type == dnsmessage.TypeA {
			rh.Type = dnsmessage.TypeA
			ans = append(ans, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AResource{A: ip.As4()}})
		} else if ip.Is6() && q.Type == dnsmessage.TypeAAAA {
			rh.Type = dnsmessage.TypeAAAA
			ans = append(ans, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AAAAResource{AAAA: ip.As16()}})
		}
	}
	return s.reply(h, qs, dnsmessage.RCodeSuccess, ans)
}
