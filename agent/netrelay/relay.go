// Package netrelay is the guest half of virtkit's network: it creates a tap device, connects to the
// host switch (over vsock in a VM, or any endpoint URL of package addr), relays Ethernet frames
// both ways with the switch's length-prefixed framing, configures the interface (DHCP from the
// switch, or a static address) without needing any tool in the guest, and reconnects whenever the
// host side goes away.
//
// It runs inside the guest agent, so it must not depend on gVisor, NATS or zerolog: it uses only
// the gVisor-free switch/frame and switch/dhcp packages. Run owns every goroutine it starts and
// returns when its context ends.
package netrelay

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/switch/dhcp"
	"github.com/virtkit/virtkit/switch/frame"
)

// Modes of address configuration.
const (
	ModeDHCP   = "dhcp"   // ask the switch (built-in client)
	ModeStatic = "static" // Config.Address/Gateway/DNS
	ModeNone   = "none"   // only bring the link up (an external DHCP client such as udhcpc configures it)
)

// Config configures the relay. Zero values are defaults.
type Config struct {
	// Connect is the switch endpoint (addr URL); default vsock://2:1025.
	Connect string
	// Tap is the device name; default vk0.
	Tap string
	// NIC, when set, names a kernel network interface to configure instead of relaying (a VM on
	// an operator's tap: eth0 is on their network already). Connect and Tap are then unused.
	NIC string
	// MTU of the tap; 0 takes the MTU the switch's DHCP offers (1500 without one).
	MTU int
	// MAC of the tap; empty keeps the kernel's random one.
	MAC net.HardwareAddr
	// Mode is ModeDHCP (default), ModeStatic or ModeNone.
	Mode string
	// Static configuration (ModeStatic).
	Address netip.Prefix
	Gateway netip.Addr
	DNS     []netip.Addr
	Search  string
	// ResolvConf is written with the DNS servers and search domain; empty leaves it alone.
	ResolvConf string
	// Hostname is sent in DHCP requests.
	Hostname string
	// Logf receives progress and errors; nil discards them.
	Logf func(format string, args ...any)
	// NoOffload turns off the tap's segmentation and checksum offload. By default the guest kernel
	// hands TCP super-segments of up to 64 KiB to the relay, which completes their checksum and
	// sends each as one frame (the switch and other relays accept frames above the MTU).
	NoOffload bool
	// Ready, if set, is called once the interface is configured the first time.
	Ready func(Lease)
}

// Lease is the configuration applied to the interface.
type Lease = dhcp.Lease

// Run creates the tap and relays until ctx ends (with Config.NIC: configures that interface until
// ctx ends). Failures of the host side are retried forever;
// only set-up errors (no tap, bad configuration) are returned.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Connect == "" {
		cfg.Connect = fmt.Sprintf("vsock://2:%d", addr.PortNet)
	}
	if cfg.Tap == "" {
		cfg.Tap = "vk0"
	}
	if cfg.Mode == "" {
		cfg.Mode = ModeDHCP
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.MTU != 0 && (cfg.MTU < 576 || cfg.MTU > frame.MaxMTU) {
		return fmt.Errorf("netrelay: mtu %d: want 576..%d", cfg.MTU, frame.MaxMTU)
	}
	switch cfg.Mode {
	case ModeDHCP, ModeNone:
	case ModeStatic:
		if !cfg.Address.IsValid() || !cfg.Address.Addr().Is4() {
			return fmt.Errorf("netrelay: static mode needs an IPv4 address/prefix")
		}
	default:
		return fmt.Errorf("netrelay: mode %q: want dhcp, static or none", cfg.Mode)
	}
	if cfg.NIC != "" {
		return runNIC(ctx, cfg)
	}
	if _, err := addr.Parse(cfg.Connect); err != nil {
		return fmt.Errorf("netrelay: %w", err)
	}
	tap, vnet, err := openTap(cfg.Tap, !cfg.NoOffload)
	if err != nil {
		return err
	}
	defer tap.Close()
	r := &relay{cfg: cfg, tap: tap, vnet: vnet}
	if r.rawTap, err = tap.SyscallConn(); err != nil {
		return fmt.Errorf("netrelay: tap: %w", err)
	}
	if len(cfg.MAC) > 0 {
		m, ok := frame.MACFrom(cfg.MAC)
		if !ok {
			return fmt.Errorf("netrelay: MAC %s is not an Ethernet address", cfg.MAC)
		}
		if err := setLinkMAC(cfg.Tap, m); err != nil {
			return err
		}
	}
	if r.mac, err = linkMAC(cfg.Tap); err != nil {
		return err
	}
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = 1500
	}
	if err := setMTU(cfg.Tap, mtu); err != nil {
		return err
	}
	if err := setUp(cfg.Tap); err != nil {
		return err
	}
	if cfg.Mode == ModeStatic {
		l := dhcp.Lease{IP: cfg.Address, Router: cfg.Gateway, DNS: cfg.DNS, Domain: cfg.Search, MTU: cfg.MTU}
		if err := r.apply(l); err != nil {
			return err
		}
	}
	return r.loop(ctx)
}

type relay struct {
	cfg     Config
	tap     *os.File
	vnet    bool            // frames on the tap carry a virtio-net header
	rawTap  syscall.RawConn // for writev of header and frame
	mac     frame.MAC
	applied *dhcp.Lease
	ready   bool
	// partial: the switch answered frame.Hello, so TCP/UDP frames go both ways with their
	// checksums left partial (NEEDS_CSUM on the tap) instead of being summed here. Per session.
	partial atomic.Bool
}

func (r *relay) loop(ctx context.Context) error {
	backoff := 50 * time.Millisecond
	for {
		c, err := addr.Dial(ctx, r.cfg.Connect)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			r.cfg.Logf("netrelay: connect %s: %v (retrying in %v)", r.cfg.Connect, err, backoff)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		start := time.Now()
		err = r.session(ctx, c)
		c.Close()
		if ctx.Err() != nil {
			return nil
		}
		lasted := time.Since(start)
		r.cfg.Logf("netrelay: switch connection ended after %v: %v; reconnecting", lasted.Round(time.Millisecond), err)
		if lasted > 5*time.Second {
			backoff = 50 * time.Millisecond
			continue
		}
		// A session that fails at once (a NAK, a switch that hangs up) must not spin.
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// session serves one connection to the switch.
func (r *relay) session(ctx context.Context, c net.Conn) error {
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	rd := frame.NewReader(c, 0)
	r.partial.Store(false)
	if r.vnet {
		// Offer partial checksums; a virtkit switch acks (see r.control), others ignore it.
		rd.AcceptPartial()
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(frame.Append(nil, frame.Hello(r.mac))); err != nil {
			return fmt.Errorf("hello: %w", err)
		}
		c.SetWriteDeadline(time.Time{})
	}
	switch r.cfg.Mode {
	case ModeDHCP:
		l, err := r.dhcp(ctx, c, rd)
		if err != nil {
			return err
		}
		if r.applied == nil || !sameLease(*r.applied, l) {
			if err := r.apply(l); err != nil {
				return err
			}
		}
	default:
		if !r.ready {
			r.ready = true
			if r.cfg.Ready != nil {
				r.cfg.Ready(dhcp.Lease{IP: r.cfg.Address, Router: r.cfg.Gateway, DNS: r.cfg.DNS, MTU: r.cfg.MTU})
			}
		}
	}
	errc := make(chan error, 2)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // switch → tap
		defer wg.Done()
		for {
			f, err := rd.Next()
			if err != nil {
				errc <- fmt.Errorf("read from switch: %w", err)
				return
			}
			if r.control(f) {
				continue
			}
			if err := r.writeTap(f, rd.Partial()); err != nil {
				if errors.Is(err, os.ErrClosed) {
					errc <- err
					return
				}
				// EINVAL for a malformed frame, ENOBUFS under pressure: drop the frame.
			}
		}
	}()
	go func() { // tap → switch
		defer wg.Done()
		errc <- r.tapToSwitch(c)
	}()
	err := <-errc
	c.Close()
	r.tap.SetReadDeadline(time.Unix(1, 0)) // wake the tap reader
	wg.Wait()
	r.tap.SetReadDeadline(time.Time{})
	return err
}

// tapToSwitch copies frames from the tap to the switch, reading every frame the tap has ready
// (up to a batch) before one write, so a busy guest costs one write per batch, not per frame.
func (r *relay) tapToSwitch(c net.Conn) error {
	rc, err := r.tap.SyscallConn()
	if err != nil {
		return fmt.Errorf("tap: %w", err)
	}
	buf := make([]byte, 4*(frame.HeaderLen+frame.MaxLen))
	var hdr [vnetHdrLen]byte
	iov := [][]byte{hdr[:], nil}
	for {
		off, frames := 0, 0
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			for len(buf)-off >= frame.HeaderLen+frame.MaxLen && frames < 128 {
				dst := buf[off+frame.HeaderLen : off+frame.HeaderLen+frame.MaxLen]
				var n int
				var err error
				if r.vnet {
					iov[1] = dst
					n, err = unix.Readv(int(fd), iov)
					n -= vnetHdrLen
				} else {
					n, err = unix.Read(int(fd), dst)
				}
				if err == unix.EAGAIN {
					return off > 0 // nothing more ready: send what we have, or wait
				}
				if err == unix.EINTR {
					continue
				}
				if err != nil {
					rerr = err
					return true
				}
				if n < frame.MinLen {
					continue
				}
				frame.PutHeader(buf[off:], n)
				if r.vnet && hdr[0]&vnetNeedsCsum != 0 {
					// A super-segment or a packet with its checksum left to the "hardware". A
					// switch that took partial checksums gets it as it is (flagged); otherwise
					// the relay is the hardware. The whole segment goes as one frame.
					if _, _, ok := frame.L4Checksum(dst[:n]); ok && r.partial.Load() {
						frame.SetPartial(buf[off:])
					} else {
						frame.FixChecksum(dst[:n])
					}
				}
				off += frame.HeaderLen + n
				frames++
			}
			return true
		})
		if off > 0 {
			if _, werr := c.Write(buf[:off]); werr != nil {
				return fmt.Errorf("write to switch: %w", werr)
			}
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil
			}
			return fmt.Errorf("read from tap: %w", err)
		}
		if rerr != nil {
			return fmt.Errorf("read from tap: %w", rerr)
		}
	}
}

// zeroVnet is the header of frames written to the tap: no offload, checksum already complete.
var zeroVnet [vnetHdrLen]byte

// control consumes the switch's control frames: the answer to frame.Hello turns partial
// checksums on for this session.
func (r *relay) control(f []byte) bool {
	if frame.Type(f) != frame.TypeControl {
		return false
	}
	if frame.IsHelloAck(f) && r.vnet && !r.partial.Load() {
		r.partial.Store(true)
		r.cfg.Logf("netrelay: switch takes partial checksums")
	}
	return true
}

// writeTap writes one frame to the tap. A partial frame goes with NEEDS_CSUM and the checksum's
// place, as a virtio-net device would pass it: the guest kernel neither sums nor verifies it.
func (r *relay) writeTap(f []byte, partial bool) error {
	if !r.vnet {
		if partial {
			frame.FixChecksum(f)
		}
		_, err := r.tap.Write(f)
		return err
	}
	hdr := zeroVnet[:]
	if partial {
		if start, off, ok := frame.L4Checksum(f); ok {
			var h [vnetHdrLen]byte
			h[0] = vnetNeedsCsum
			binary.NativeEndian.PutUint16(h[6:8], uint16(start))
			binary.NativeEndian.PutUint16(h[8:10], uint16(off))
			hdr = h[:]
		} else {
			frame.FixChecksum(f)
		}
	}
	var werr error
	err := r.rawTap.Write(func(fd uintptr) bool {
		_, werr = unix.Writev(int(fd), [][]byte{hdr, f})
		return werr != unix.EAGAIN
	})
	if err != nil {
		return err
	}
	return werr
}

// dhcp runs the built-in client over the fresh connection, before frames are relayed.
func (r *relay) dhcp(ctx context.Context, c net.Conn, rd *frame.Reader) (dhcp.Lease, error) {
	defer c.SetDeadline(time.Time{})
	var xb [4]byte
	rand.Read(xb[:])
	xid := binary.BigEndian.Uint32(xb[:])
	for attempt := 0; attempt < 5 && ctx.Err() == nil; attempt++ {
		wait := time.Duration(1<<attempt) * 500 * time.Millisecond
		offer, err := r.exchange(c, rd, dhcp.NewDiscover(r.mac, xid, r.cfg.Hostname), dhcp.Offer, wait)
		if err != nil {
			if isTimeout(err) {
				continue
			}
			return dhcp.Lease{}, err
		}
		ack, err := r.exchange(c, rd, dhcp.NewRequest(offer, r.mac, r.cfg.Hostname), dhcp.Ack, wait)
		if err != nil {
			if isTimeout(err) {
				continue
			}
			return dhcp.Lease{}, err
		}
		l, err := dhcp.LeaseFrom(ack)
		if err != nil {
			return dhcp.Lease{}, err
		}
		r.cfg.Logf("netrelay: dhcp lease %s router %s dns %v mtu %d", l.IP, l.Router, l.DNS, l.MTU)
		return l, nil
	}
	return dhcp.Lease{}, fmt.Errorf("dhcp: no answer from the switch")
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

var errNak = errors.New("dhcp: the switch refused the request (NAK)")

// exchange sends m and waits up to wait for a reply of type want with the same transaction id.
func (r *relay) exchange(c net.Conn, rd *frame.Reader, m *dhcp.Message, want uint8, wait time.Duration) (*dhcp.Message, error) {
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(frame.Append(nil, dhcp.ClientFrame(m))); err != nil {
		return nil, fmt.Errorf("dhcp: send: %w", err)
	}
	c.SetReadDeadline(time.Now().Add(wait))
	for {
		f, err := rd.Next()
		if err != nil {
			return nil, fmt.Errorf("dhcp: %w", err)
		}
		if r.control(f) {
			continue
		}
		rep, _, ok, err := dhcp.ParseFrame(f, dhcp.ClientPort)
		if !ok || err != nil || rep.Op != 2 || rep.XID != m.XID || rep.CHAddr != r.mac {
			continue // not ours; nothing else may reach the unconfigured interface anyway
		}
		switch rep.Type() {
		case want:
			return rep, nil
		case dhcp.Nak:
			return nil, errNak
		}
	}
}

func sameLease(a, b dhcp.Lease) bool {
	return a.IP == b.IP && a.Router == b.Router && a.MTU == b.MTU && a.Domain == b.Domain &&
		fmt.Sprint(a.DNS) == fmt.Sprint(b.DNS)
}

// apply configures the interface from l.
func (r *relay) apply(l dhcp.Lease) error {
	name := r.cfg.Tap
	if r.cfg.MTU == 0 && l.MTU >= 576 && l.MTU <= frame.MaxMTU {
		if err := setMTU(name, l.MTU); err != nil {
			return err
		}
	}
	if err := setAddr(name, l.IP); err != nil {
		return err
	}
	if err := setUp(name); err != nil {
		return err
	}
	if l.Router.IsValid() {
		if err := setDefaultRoute(name, l.Router); err != nil {
			return err
		}
	}
	if r.cfg.ResolvConf != "" && len(l.DNS) > 0 {
		var b strings.Builder
		b.WriteString("# written by virtkit-agent net\n")
		if l.Domain != "" {
			fmt.Fprintf(&b, "search %s\n", l.Domain)
		}
		for _, d := range l.DNS {
			fmt.Fprintf(&b, "nameserver %s\n", d)
		}
		if err := writeFileAtomic(r.cfg.ResolvConf, []byte(b.String())); err != nil {
			return err
		}
	}
	r.applied = &l
	r.cfg.Logf("netrelay: %s configured: %s via %s", name, l.IP, l.Router)
	if !r.ready {
		r.ready = true
		if r.cfg.Ready != nil {
			r.cfg.Ready(l)
		}
	}
	return nil
}

// writeFileAtomic replaces path; where path is a bind mount (a rename would fail) it writes in place.
func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".vk-tmp"
	if err := os.WriteFile(tmp, b, 0o644); err == nil {
		if err := os.Rename(tmp, path); err == nil {
			return nil
		}
		os.Remove(tmp)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("netrelay: write %s: %w", path, err)
	}
	return nil
}
