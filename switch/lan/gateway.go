package lan

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/virtkit/virtkit/switch/frame"
)

const nicID tcpip.NICID = 1

// startGateway builds the netstack, attaches it to the switch and starts DNS and egress.
func (s *Switch) startGateway() error {
	st := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4},
	})
	s.stack = st
	opts := []tcpip.SettableTransportProtocolOption{
		ptr(tcpip.TCPSACKEnabled(true)),
		ptr(tcpip.TCPModerateReceiveBufferOption(true)),
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 4 << 20, Max: 16 << 20},
		&tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: 8 << 20},
	}
	for _, o := range opts {
		if err := st.SetTransportProtocolOption(tcp.ProtocolNumber, o); err != nil {
			return fmt.Errorf("lan: gateway tcp option %T: %s", o, err)
		}
	}
	s.link = &linkEndpoint{sw: s, mtu: uint32(s.cfg.MTU), mac: tcpip.LinkAddress(s.gwMAC[:])}
	if err := st.CreateNICWithOptions(nicID, s.link, stack.NICOptions{Name: "gw"}); err != nil {
		return fmt.Errorf("lan: gateway nic: %s", err)
	}
	pa := tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(s.cfg.Gateway.As4()), PrefixLen: s.cfg.Subnet.Bits()},
	}
	if err := st.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
		return fmt.Errorf("lan: gateway address: %s", err)
	}
	st.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: nicID}})
	// Promiscuous + spoofing: the gateway accepts packets for any destination (egress) and can
	// answer as that destination.
	if err := st.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("lan: gateway promiscuous: %s", err)
	}
	if err := st.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("lan: gateway spoofing: %s", err)
	}
	tf := tcp.NewForwarder(st, 0, 4096, s.egressTCP)
	st.SetTransportProtocolHandler(tcp.ProtocolNumber, tf.HandlePacket)
	uf := udp.NewForwarder(st, s.egressUDP)
	st.SetTransportProtocolHandler(udp.ProtocolNumber, uf.HandlePacket)

	dnsConn, err := gonet.DialUDP(st, &tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(s.cfg.Gateway.As4()), Port: 53}, nil, ipv4.ProtocolNumber)
	if err != nil {
		return fmt.Errorf("lan: gateway dns listener: %w", err)
	}
	dnsTCP, err := gonet.ListenTCP(st, tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(s.cfg.Gateway.As4()), Port: 53}, ipv4.ProtocolNumber)
	if err != nil {
		dnsConn.Close()
		return fmt.Errorf("lan: gateway dns tcp listener: %w", err)
	}
	s.wg.Add(3)
	go func() {
		defer s.wg.Done()
		<-s.ctx.Done()
		dnsConn.Close()
		dnsTCP.Close()
	}()
	go s.serveDNS(dnsConn)
	go s.serveDNSTCP(dnsTCP)
	return nil
}

// serveDNSTCP answers DNS over TCP (RFC 7766: 2-byte length prefix, several queries per
// connection), which resolvers use after a truncated UDP answer.
func (s *Switch) serveDNSTCP(l *gonet.TCPListener) {
	defer s.wg.Done()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			stop := context.AfterFunc(s.ctx, func() { c.Close() })
			defer stop()
			var hdr [2]byte
			for {
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.ReadFull(c, hdr[:]); err != nil {
					return
				}
				q := make([]byte, binary.BigEndian.Uint16(hdr[:]))
				if _, err := io.ReadFull(c, q); err != nil {
					return
				}
				resp, err := s.dns.Answer(s.ctx, q)
				if err != nil {
					return
				}
				if _, err := c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(resp)))); err != nil {
					return
				}
				if _, err := c.Write(resp); err != nil {
					return
				}
			}
		}()
	}
}

func ptr[T any](v T) *T { return &v }

// serveDNS answers queries to the gateway's port 53, each on its own goroutine (bounded).
func (s *Switch) serveDNS(c *gonet.UDPConn) {
	defer s.wg.Done()
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	defer wg.Wait()
	buf := make([]byte, 65535)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		q := append([]byte(nil), buf[:n]...)
		select {
		case sem <- struct{}{}:
		default:
			continue // overloaded: the client retries
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			resp, err := s.dns.Answer(s.ctx, q)
			if err != nil {
				s.log.Debug().Err(err).Str("from", from.String()).Msg("dns query")
				return
			}
			c.WriteTo(resp, from)
		}()
	}
}

// linkEndpoint attaches the netstack to the switch: frames for the gateway MAC are delivered to
// the stack, and the stack's frames go back through Switch.output.
type linkEndpoint struct {
	sw  *Switch
	mac tcpip.LinkAddress

	mu         sync.RWMutex
	mtu        uint32
	dispatcher stack.NetworkDispatcher
}

var _ stack.LinkEndpoint = (*linkEndpoint)(nil)

// headerSplit covers an Ethernet, an IPv4 and a TCP header with all their options.
const headerSplit = header.EthernetMinimumSize + header.IPv4MaximumHeaderSize + header.TCPHeaderMaximumSize

// deliver hands frame f to the netstack. v, when not nil, holds f (longer than zeroCopyMin: a
// port reads only such frames into views) and is taken over (the payload is not copied).
func (e *linkEndpoint) deliver(f []byte, v *buffer.View) {
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		if v != nil {
			v.Release()
		}
		return
	}
	// Headers and payload go in separate views: the netstack pulls headers up from a shared
	// buffer by cloning the view that holds them, and that must not be a 64 KiB one.
	var payload buffer.Buffer
	if len(f) > zeroCopyMin {
		h := headerSplit
		payload.Append(buffer.NewViewWithData(f[:h]))
		if v != nil {
			v.TrimFront(h)
			payload.Append(v)
		} else {
			payload.Append(buffer.NewViewWithData(f[h:]))
		}
	} else {
		payload.Append(buffer.NewViewWithData(f))
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload})
	defer pkt.DecRef()
	if !e.ParseHeader(pkt) {
		return
	}
	eth := header.Ethernet(pkt.LinkHeader().Slice())
	if string(eth.DestinationAddress()) == string(frame.Broadcast[:]) {
		pkt.PktType = tcpip.PacketBroadcast
	} else {
		pkt.PktType = tcpip.PacketHost
	}
	d.DeliverNetworkPacket(eth.Type(), pkt)
}

func (e *linkEndpoint) MTU() uint32 {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.mtu
}
func (e *linkEndpoint) SetMTU(m uint32) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.mtu = m
}
func (e *linkEndpoint) MaxHeaderLength() uint16                 { return header.EthernetMinimumSize }
func (e *linkEndpoint) LinkAddress() tcpip.LinkAddress          { return e.mac }
func (e *linkEndpoint) SetLinkAddress(tcpip.LinkAddress)        {}
func (e *linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }
func (e *linkEndpoint) Wait()                                   {}
func (e *linkEndpoint) Close()                                  {}
func (e *linkEndpoint) SetOnCloseAction(func())                 {}

// Capabilities: frames come from guests over a reliable stream, nothing can corrupt them in
// flight, so the gateway skips receive checksum verification; relays that negotiated partial
// checksums (frame.Hello) rely on that and leave TCP/UDP checksums unsummed.
func (e *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityResolutionRequired | stack.CapabilityRXChecksumOffload
}

// gsoMaxSize bounds the TCP super-segments the gateway sends: one IPv4 packet with headers.
const gsoMaxSize = 65535 - header.IPv4MaximumHeaderSize - header.TCPHeaderMaximumSize

// GSOMaxSize and SupportedGSO let the gateway's TCP send super-segments of up to 64 KiB as one
// frame (with a partial checksum the port's writer completes unless the relay takes it as
// NEEDS_CSUM), as a NIC's receive offload would hand them
// to a guest: guests behind virtkit's relay accept frames above their MTU, and bulk host→guest
// traffic then costs one frame per 64 KiB instead of one per MSS.
func (e *linkEndpoint) GSOMaxSize() uint32 { return gsoMaxSize }

func (e *linkEndpoint) SupportedGSO() stack.SupportedGSO {
	if e.sw.cfg.NoOffload {
		return stack.GSONotSupported
	}
	return stack.HostGSOSupported
}

func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dispatcher = d
}

func (e *linkEndpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

func (e *linkEndpoint) AddHeader(pkt *stack.PacketBuffer) {
	eth := header.Ethernet(pkt.LinkHeader().Push(header.EthernetMinimumSize))
	eth.Encode(&header.EthernetFields{
		SrcAddr: e.mac,
		DstAddr: pkt.EgressRoute.RemoteLinkAddress,
		Type:    pkt.NetworkProtocolNumber,
	})
}

func (e *linkEndpoint) ParseHeader(pkt *stack.PacketBuffer) bool {
	_, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	return ok
}

func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		if pkt.Size() > zeroCopyMin && len(pkt.LinkHeader().Slice()) == header.EthernetMinimumSize {
			// Bulk: the port's writer sends the netstack's views as they are.
			e.sw.output(pktBuf(pkt.IncRef()))
			n++
			continue
		}
		b := getBuf(pkt.Size())
		off := frame.HeaderLen
		for _, sl := range pkt.AsSlices() {
			off += copy(b.b[off:], sl)
		}
		// Completed by the port's writer unless its relay takes partial checksums.
		b.partial = pkt.GSOOptions.NeedsCsum
		e.sw.output(b)
		n++
	}
	return n, nil
}

// zeroCopyMin is the frame size above which frames cross between the ports and the netstack
// without a copy in user space: the gateway queues its packets by reference, and a port reads
// a guest's frame straight into a view that becomes the packet. Below it a copy is cheaper than
// holding the netstack's buffers.
const zeroCopyMin = 4096

// addrFrom converts a netstack address.
func addrFrom(a tcpip.Address) netip.Addr {
	if a.Len() == 4 {
		return netip.AddrFrom4(a.As4())
	}
	return netip.AddrFrom16(a.As16()).Unmap()
}

// dialGuest opens a TCP connection from the gateway to a guest.
func (s *Switch) dialGuest(ctx context.Context, ip netip.Addr, port uint16) (*guestConn, error) {
	fail := func(err error) (*guestConn, error) {
		return nil, fmt.Errorf("lan: dial guest %s:%d: %w", ip, port, err)
	}
	// gonet.DialContextTCP, but keeping the endpoint and its queue: the splice moves bulk data
	// between them and the host socket without copy buffers (guestConn).
	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
	if terr != nil {
		return fail(errors.New(terr.String()))
	}
	we, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)
	terr = ep.Connect(tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(ip.As4()), Port: port})
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Close()
			return fail(ctx.Err())
		case <-notify:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return fail(errors.New(terr.String()))
	}
	return &guestConn{TCPConn: gonet.NewTCPConn(&wq, ep), ep: ep, wq: &wq}, nil
}
