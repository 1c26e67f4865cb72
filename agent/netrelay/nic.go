package netrelay

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/switch/dhcp"
	"github.com/virtkit/virtkit/switch/frame"
)

// runNIC configures the kernel interface cfg.NIC instead of relaying (a VM on an operator's tap:
// its virtio-net NIC is on their network already). The link comes up; in ModeDHCP the built-in
// client asks the network's DHCP server over a packet socket and renews at half the lease; in
// ModeStatic the address is set once.
func runNIC(ctx context.Context, cfg Config) error {
	name := cfg.NIC
	cfg.Tap = name // apply configures cfg.Tap
	// The NIC is probed as the kernel boots; it is there long before init runs, but allow a moment.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := net.InterfaceByName(name); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("netrelay: interface %s: %w", name, err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(50 * time.Millisecond):
		}
	}
	if len(cfg.MAC) > 0 {
		m, ok := frame.MACFrom(cfg.MAC)
		if !ok {
			return fmt.Errorf("netrelay: MAC %s is not an Ethernet address", cfg.MAC)
		}
		if err := setLinkMAC(name, m); err != nil {
			return err
		}
	}
	mac, err := linkMAC(name)
	if err != nil {
		return err
	}
	if cfg.MTU != 0 {
		if err := setMTU(name, cfg.MTU); err != nil {
			return err
		}
	}
	if err := setUp(name); err != nil {
		return err
	}
	r := &relay{cfg: cfg, mac: mac}
	switch cfg.Mode {
	case ModeStatic:
		if err := r.apply(dhcp.Lease{IP: cfg.Address, Router: cfg.Gateway, DNS: cfg.DNS, Domain: cfg.Search, MTU: cfg.MTU}); err != nil {
			return err
		}
		<-ctx.Done()
		return nil
	case ModeNone:
		<-ctx.Done()
		return nil
	}
	backoff := time.Second
	for ctx.Err() == nil {
		l, err := nicLease(ctx, name, mac, cfg.Hostname)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			cfg.Logf("netrelay: %s: %v (retrying in %v)", name, err, backoff)
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		backoff = time.Second
		if r.applied == nil || !sameLease(*r.applied, l) {
			if err := r.apply(l); err != nil {
				return err
			}
		}
		if l.Duration <= 0 {
			<-ctx.Done()
			return nil
		}
		select {
		case <-ctx.Done():
		case <-time.After(l.Duration / 2):
		}
	}
	return nil
}

// nicLease runs one DHCP exchange (discover, offer, request, ack) on interface name through a
// packet socket, which sees the server's answers before the interface has an address.
func nicLease(ctx context.Context, name string, mac frame.MAC, hostname string) (dhcp.Lease, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return dhcp.Lease{}, err
	}
	proto := int(htons(unix.ETH_P_IP))
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return dhcp.Lease{}, fmt.Errorf("dhcp: packet socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index}); err != nil {
		return dhcp.Lease{}, fmt.Errorf("dhcp: bind to %s: %w", name, err)
	}
	stop := context.AfterFunc(ctx, func() { unix.Shutdown(fd, unix.SHUT_RDWR) })
	defer stop()
	var xb [4]byte
	rand.Read(xb[:])
	xid := binary.BigEndian.Uint32(xb[:])
	buf := make([]byte, 2048)
	exchange := func(m *dhcp.Message, want uint8, wait time.Duration) (*dhcp.Message, error) {
		if _, err := unix.Write(fd, dhcp.ClientFrame(m)); err != nil {
			return nil, fmt.Errorf("dhcp: send: %w", err)
		}
		end := time.Now().Add(wait)
		for {
			left := time.Until(end)
			if left <= 0 {
				return nil, os.ErrDeadlineExceeded
			}
			tv := unix.NsecToTimeval(left.Nanoseconds())
			unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("dhcp: receive: %w", err)
			}
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			rep, _, ok, err := dhcp.ParseFrame(buf[:n], dhcp.ClientPort)
			if !ok || err != nil || rep.Op != 2 || rep.XID != m.XID || rep.CHAddr != mac {
				continue
			}
			switch rep.Type() {
			case want:
				return rep, nil
			case dhcp.Nak:
				return nil, errNak
			}
		}
	}
	for attempt := 0; attempt < 5 && ctx.Err() == nil; attempt++ {
		wait := time.Duration(1<<attempt) * 500 * time.Millisecond
		offer, err := exchange(dhcp.NewDiscover(mac, xid, hostname), dhcp.Offer, wait)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil {
			return dhcp.Lease{}, err
		}
		ack, err := exchange(dhcp.NewRequest(offer, mac, hostname), dhcp.Ack, wait)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil {
			return dhcp.Lease{}, err
		}
		return dhcp.LeaseFrom(ack)
	}
	if ctx.Err() != nil {
		return dhcp.Lease{}, ctx.Err()
	}
	return dhcp.Lease{}, errors.New("dhcp: no answer from a DHCP server")
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
