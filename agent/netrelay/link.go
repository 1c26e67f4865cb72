package netrelay

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/switch/frame"
)

// Tap offload flags (linux/if_tun.h) and the virtio-net header the tap then prefixes frames with.
const (
	tunFCsum      = 0x01
	tunFTSO4      = 0x02
	vnetHdrLen    = 10
	vnetNeedsCsum = 1
)

// openTap creates (or attaches to) the tap device name and returns it as a pollable file. With
// offload the tap carries a virtio-net header and the guest kernel may hand over TCP
// super-segments of up to 64 KiB with the checksum left to us; the bool reports whether frames
// carry the header.
func openTap(name string, wantOffload bool) (*os.File, bool, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, false, fmt.Errorf("netrelay: open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, false, fmt.Errorf("netrelay: tap name %q: %w", name, err)
	}
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if wantOffload {
		flags |= unix.IFF_VNET_HDR
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, false, fmt.Errorf("netrelay: create tap %s: %w", name, err)
	}
	if wantOffload {
		// If the kernel refuses, the header stays on without offloads: frames still carry it
		// and simply never need completing.
		_ = unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tunFCsum|tunFTSO4)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), wantOffload, nil
}

// ctlSocket is the datagram socket the interface ioctls go through.
func ctlSocket() (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("netrelay: control socket: %w", err)
	}
	return fd, nil
}

func ifioctl(name string, req uint, set func(*unix.Ifreq)) (*unix.Ifreq, error) {
	fd, err := ctlSocket()
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return nil, err
	}
	if set != nil {
		set(ifr)
	}
	if err := unix.IoctlIfreq(fd, req, ifr); err != nil {
		return nil, err
	}
	return ifr, nil
}

// hwIfreq is struct ifreq with the sockaddr of SIOC[GS]IFHWADDR.
type hwIfreq struct {
	name   [unix.IFNAMSIZ]byte
	family uint16
	data   [14]byte
	_      [8]byte
}

func linkMAC(name string) (frame.MAC, error) {
	fd, err := ctlSocket()
	if err != nil {
		return frame.MAC{}, err
	}
	defer unix.Close(fd)
	var r hwIfreq
	copy(r.name[:], name)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCGIFHWADDR, uintptr(unsafe.Pointer(&r))); e != 0 {
		return frame.MAC{}, fmt.Errorf("netrelay: read MAC of %s: %w", name, e)
	}
	var m frame.MAC
	copy(m[:], r.data[:6])
	return m, nil
}

func setLinkMAC(name string, m frame.MAC) error {
	fd, err := ctlSocket()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var r hwIfreq
	copy(r.name[:], name)
	r.family = unix.ARPHRD_ETHER
	copy(r.data[:], m[:])
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCSIFHWADDR, uintptr(unsafe.Pointer(&r))); e != 0 {
		return fmt.Errorf("netrelay: set MAC of %s to %s: %w", name, m, e)
	}
	return nil
}

func setMTU(name string, mtu int) error {
	if _, err := ifioctl(name, unix.SIOCSIFMTU, func(r *unix.Ifreq) { r.SetUint32(uint32(mtu)) }); err != nil {
		return fmt.Errorf("netrelay: set MTU of %s to %d: %w", name, mtu, err)
	}
	return nil
}

func setUp(name string) error {
	r, err := ifioctl(name, unix.SIOCGIFFLAGS, nil)
	if err != nil {
		return fmt.Errorf("netrelay: read flags of %s: %w", name, err)
	}
	flags := r.Uint16() | unix.IFF_UP
	if _, err := ifioctl(name, unix.SIOCSIFFLAGS, func(r *unix.Ifreq) { r.SetUint16(flags) }); err != nil {
		return fmt.Errorf("netrelay: bring %s up: %w", name, err)
	}
	return nil
}

// setAddr gives the interface its IPv4 address and netmask (replacing the primary address).
func setAddr(name string, p netip.Prefix) error {
	a := p.Addr().As4()
	if _, err := ifioctl(name, unix.SIOCSIFADDR, func(r *unix.Ifreq) { r.SetInet4Addr(a[:]) }); err != nil {
		return fmt.Errorf("netrelay: set address of %s to %s: %w", name, p, err)
	}
	m := net.CIDRMask(p.Bits(), 32)
	if _, err := ifioctl(name, unix.SIOCSIFNETMASK, func(r *unix.Ifreq) { r.SetInet4Addr(m) }); err != nil {
		return fmt.Errorf("netrelay: set netmask of %s to /%d: %w", name, p.Bits(), err)
	}
	return nil
}

// setDefaultRoute replaces the default route with one via gw on the interface (rtnetlink).
func setDefaultRoute(name string, gw netip.Addr) error {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return fmt.Errorf("netrelay: default route: %w", err)
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netrelay: default route: netlink socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netrelay: default route: netlink bind: %w", err)
	}
	var msg []byte
	msg = binary.NativeEndian.AppendUint32(msg, 0) // length, filled below
	msg = binary.NativeEndian.AppendUint16(msg, unix.RTM_NEWROUTE)
	msg = binary.NativeEndian.AppendUint16(msg, unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_REPLACE)
	msg = binary.NativeEndian.AppendUint32(msg, 1) // seq
	msg = binary.NativeEndian.AppendUint32(msg, 0) // pid
	msg = append(msg, unix.AF_INET, 0, 0, 0, unix.RT_TABLE_MAIN, unix.RTPROT_BOOT, unix.RT_SCOPE_UNIVERSE, unix.RTN_UNICAST)
	msg = binary.NativeEndian.AppendUint32(msg, 0) // rtm_flags
	g := gw.As4()
	msg = binary.NativeEndian.AppendUint16(msg, 8)
	msg = binary.NativeEndian.AppendUint16(msg, unix.RTA_GATEWAY)
	msg = append(msg, g[:]...)
	msg = binary.NativeEndian.AppendUint16(msg, 8)
	msg = binary.NativeEndian.AppendUint16(msg, unix.RTA_OIF)
	msg = binary.NativeEndian.AppendUint32(msg, uint32(ifi.Index))
	binary.NativeEndian.PutUint32(msg, uint32(len(msg)))
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netrelay: default route: netlink send: %w", err)
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return fmt.Errorf("netrelay: default route: netlink ack: %w", err)
	}
	if n >= unix.SizeofNlMsghdr+4 && binary.NativeEndian.Uint16(buf[4:6]) == unix.NLMSG_ERROR {
		if e := int32(binary.NativeEndian.Uint32(buf[16:20])); e != 0 {
			return fmt.Errorf("netrelay: default route via %s dev %s: %w", gw, name, unix.Errno(-e))
		}
	}
	return nil
}
