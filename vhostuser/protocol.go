// Package vhostuser is the backend ("device") side of the vhost-user protocol: message framing with
// file descriptors passed over a unix socket (SCM_RIGHTS), feature and protocol-feature
// negotiation, the guest memory table (mmap of the frontend's memfds), split virtqueues with
// indirect descriptors and event-index notification suppression, and kick/call eventfds.
// Device-specific behaviour (virtio-vsock in vhostuser/vsock, virtio-fs in vhostuser/virtiofs)
// plugs in through the Device interface.
//
// Everything that crosses the socket or sits in guest memory is treated as hostile: message sizes,
// region tables and ring addresses are checked before use, descriptor chains are bounded and
// checked against guest memory, and a malformed ring marks that queue broken instead of
// crashing the process.
//
// Concurrency: Serve runs one session at a time per listener; session messages are handled on
// one goroutine. A Queue may be used by several goroutines at once (Pop by one, Push/Notify by
// any); its methods lock internally. Device callbacks are made from the session goroutine.
package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// Request codes (front-end → back-end), from the vhost-user specification.
const (
	reqGetFeatures         = 1
	reqSetFeatures         = 2
	reqSetOwner            = 3
	reqResetOwner          = 4
	reqSetMemTable         = 5
	reqSetLogBase          = 6
	reqSetLogFD            = 7
	reqSetVringNum         = 8
	reqSetVringAddr        = 9
	reqSetVringBase        = 10
	reqGetVringBase        = 11
	reqSetVringKick        = 12
	reqSetVringCall        = 13
	reqSetVringErr         = 14
	reqGetProtocolFeatures = 15
	reqSetProtocolFeatures = 16
	reqGetQueueNum         = 17
	reqSetVringEnable      = 18
	reqSendRARP            = 19
	reqNetSetMTU           = 20
	reqSetBackendReqFD     = 21
	reqIOTLBMsg            = 22
	reqSetVringEndian      = 23
	reqGetConfig           = 24
	reqSetConfig           = 25
	reqGetInflightFD       = 31
	reqSetInflightFD       = 32
	reqResetDevice         = 34
	reqGetMaxMemSlots      = 36
	reqAddMemReg           = 37
	reqRemMemReg           = 38
	reqSetStatus           = 39
	reqGetStatus           = 40
)

var reqNames = map[uint32]string{
	reqGetFeatures: "GET_FEATURES", reqSetFeatures: "SET_FEATURES", reqSetOwner: "SET_OWNER",
	reqResetOwner: "RESET_OWNER", reqSetMemTable: "SET_MEM_TABLE", reqSetLogBase: "SET_LOG_BASE",
	reqSetLogFD: "SET_LOG_FD", reqSetVringNum: "SET_VRING_NUM", reqSetVringAddr: "SET_VRING_ADDR",
	reqSetVringBase: "SET_VRING_BASE", reqGetVringBase: "GET_VRING_BASE", reqSetVringKick: "SET_VRING_KICK",
	reqSetVringCall: "SET_VRING_CALL", reqSetVringErr: "SET_VRING_ERR",
	reqGetProtocolFeatures: "GET_PROTOCOL_FEATURES", reqSetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	reqGetQueueNum: "GET_QUEUE_NUM", reqSetVringEnable: "SET_VRING_ENABLE", reqSendRARP: "SEND_RARP",
	reqNetSetMTU: "NET_SET_MTU", reqSetBackendReqFD: "SET_BACKEND_REQ_FD", reqIOTLBMsg: "IOTLB_MSG",
	reqSetVringEndian: "SET_VRING_ENDIAN", reqGetConfig: "GET_CONFIG", reqSetConfig: "SET_CONFIG",
	reqGetInflightFD: "GET_INFLIGHT_FD", reqSetInflightFD: "SET_INFLIGHT_FD", reqResetDevice: "RESET_DEVICE",
	reqGetMaxMemSlots: "GET_MAX_MEM_SLOTS", reqAddMemReg: "ADD_MEM_REG", reqRemMemReg: "REM_MEM_REG",
	reqSetStatus: "SET_STATUS", reqGetStatus: "GET_STATUS",
}

// RequestName names a vhost-user request code for logs.
func RequestName(code uint32) string {
	if n, ok := reqNames[code]; ok {
		return n
	}
	return fmt.Sprintf("REQUEST_%d", code)
}

// Header flags.
const (
	flagVersion   = 0x1
	flagVersionM  = 0x3
	flagReply     = 0x4
	flagNeedReply = 0x8
)

// Virtio and vhost-user feature bits.
const (
	FeatureNotifyOnEmpty    = 1 << 24
	FeatureIndirectDesc     = 1 << 28
	FeatureEventIdx         = 1 << 29
	FeatureProtocolFeatures = 1 << 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FeatureVersion1         = 1 << 32
)

// Protocol feature bits (VHOST_USER_PROTOCOL_F_*).
const (
	ProtoMQ                 = 1 << 0
	ProtoLogShmFD           = 1 << 1
	ProtoReplyAck           = 1 << 3
	ProtoBackendReq         = 1 << 5
	ProtoConfig             = 1 << 9
	ProtoResetDevice        = 1 << 13
	ProtoConfigureMemSlots  = 1 << 15
	ProtoStatus             = 1 << 16
	maxFDs                  = 8
	headerSize              = 12
	maxPayload              = 4096 // the largest legal payload is far smaller (SET_MEM_TABLE: 264)
	maxConfigSize           = 256
	maxMemRegions           = 8  // SET_MEM_TABLE limit
	maxMemSlots             = 32 // what we advertise for ADD_MEM_REG
	vringIndexMask          = 0xff
	vringInvalidFD          = 1 << 8
	memRegionSize           = 32
	vringAddrSize           = 40
	vringStateSize          = 8
	configHeaderSize        = 12
	protocolFeaturesOffered = ProtoMQ | ProtoReplyAck | ProtoConfig | ProtoConfigureMemSlots | ProtoResetDevice | ProtoStatus
)

// ErrProtocol marks a malformed or out-of-order message from the frontend.
var ErrProtocol = errors.New("vhost-user protocol error")

// Message is one vhost-user message with the file descriptors that came with it.
type Message struct {
	Request uint32
	Flags   uint32
	Payload []byte
	FDs     []int
}

// closeFDs closes every descriptor the message carried that nobody took.
func (m *Message) closeFDs() {
	for _, fd := range m.FDs {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	m.FDs = nil
}

// takeFD hands the message's only descriptor to the caller.
func (m *Message) takeFD() (int, error) {
	if len(m.FDs) != 1 {
		return -1, fmt.Errorf("%w: %s carries %d fds, want 1", ErrProtocol, RequestName(m.Request), len(m.FDs))
	}
	fd := m.FDs[0]
	m.FDs = nil
	return fd, nil
}

func (m *Message) u64() (uint64, error) {
	if len(m.Payload) < 8 {
		return 0, fmt.Errorf("%w: %s payload is %d bytes, want 8", ErrProtocol, RequestName(m.Request), len(m.Payload))
	}
	return binary.LittleEndian.Uint64(m.Payload), nil
}

func (m *Message) vringState() (index, num uint32, err error) {
	if len(m.Payload) < vringStateSize {
		return 0, 0, fmt.Errorf("%w: %s payload is %d bytes, want 8", ErrProtocol, RequestName(m.Request), len(m.Payload))
	}
	return binary.LittleEndian.Uint32(m.Payload), binary.LittleEndian.Uint32(m.Payload[4:]), nil
}

// ParseHeader decodes a 12-byte message header and checks the version and size bounds.
func ParseHeader(b []byte) (req, flags, size uint32, err error) {
	if len(b) < headerSize {
		return 0, 0, 0, fmt.Errorf("%w: header of %d bytes", ErrProtocol, len(b))
	}
	req = binary.LittleEndian.Uint32(b)
	flags = binary.LittleEndian.Uint32(b[4:])
	size = binary.LittleEndian.Uint32(b[8:])
	if flags&flagVersionM != flagVersion {
		return 0, 0, 0, fmt.Errorf("%w: %s: version %d, want 1", ErrProtocol, RequestName(req), flags&flagVersionM)
	}
	if size > maxPayload {
		return 0, 0, 0, fmt.Errorf("%w: %s: payload of %d bytes exceeds %d", ErrProtocol, RequestName(req), size, maxPayload)
	}
	return req, flags, size, nil
}

// ReadMessage reads one message from c. Descriptors arrive with the header; any that come with
// a malformed message are closed.
func ReadMessage(c *net.UnixConn) (*Message, error) {
	hdr := make([]byte, headerSize)
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	var fds []int
	got := 0
	for got < headerSize {
		n, oobn, flags, _, err := c.ReadMsgUnix(hdr[got:], oob)
		if oobn > 0 {
			more, perr := parseRights(oob[:oobn])
			fds = append(fds, more...)
			if perr != nil {
				closeAll(fds)
				return nil, perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			closeAll(fds)
			return nil, fmt.Errorf("%w: more than %d fds with one message", ErrProtocol, maxFDs)
		}
		if err != nil {
			closeAll(fds)
			if got == 0 && n == 0 && errors.Is(err, io.EOF) {
				return nil, io.EOF
			}
			return nil, fmt.Errorf("vhost-user: read header: %w", err)
		}
		if n == 0 {
			closeAll(fds)
			if got == 0 {
				return nil, io.EOF
			}
			return nil, fmt.Errorf("vhost-user: read header: %w", io.ErrUnexpectedEOF)
		}
		got += n
	}
	req, flags, size, err := ParseHeader(hdr)
	if err != nil {
		closeAll(fds)
		return nil, err
	}
	m := &Message{Request: req, Flags: flags, FDs: fds, Payload: make([]byte, size)}
	if _, err := io.ReadFull(c, m.Payload); err != nil {
		m.closeFDs()
		return nil, fmt.Errorf("vhost-user: read %s payload: %w", RequestName(req), err)
	}
	return m, nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("%w: control message: %v", ErrProtocol, err)
	}
	var fds []int
	for _, cm := range msgs {
		if cm.Header.Level != unix.SOL_SOCKET || cm.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		r, err := unix.ParseUnixRights(&cm)
		if err != nil {
			return fds, fmt.Errorf("%w: SCM_RIGHTS: %v", ErrProtocol, err)
		}
		fds = append(fds, r...)
	}
	return fds, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// WriteMessage sends one message, with fds attached to its first byte.
func WriteMessage(c *net.UnixConn, req, flags uint32, payload []byte, fds ...int) error {
	b := make([]byte, headerSize+len(payload))
	binary.LittleEndian.PutUint32(b, req)
	binary.LittleEndian.PutUint32(b[4:], flags|flagVersion)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[headerSize:], payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return fmt.Errorf("vhost-user: write %s: %w", RequestName(req), err)
	}
	if n != len(b) {
		return fmt.Errorf("vhost-user: write %s: short write %d of %d", RequestName(req), n, len(b))
	}
	return nil
}

func u64Payload(v uint64) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	return b
}

// MemRegion is one entry of a memory table (VhostUserMemoryRegion).
type MemRegion struct {
	GuestAddr  uint64 // guest physical address
	Size       uint64
	UserAddr   uint64 // the frontend's virtual address; ring addresses use it
	MmapOffset uint64 // offset of the region in the fd
}

func parseMemRegion(b []byte) MemRegion {
	return MemRegion{
		GuestAddr:  binary.LittleEndian.Uint64(b),
		Size:       binary.LittleEndian.Uint64(b[8:]),
		UserAddr:   binary.LittleEndian.Uint64(b[16:]),
		MmapOffset: binary.LittleEndian.Uint64(b[24:]),
	}
}

// Put encodes r into the 32-byte wire form.
func (r MemRegion) Put(b []byte) {
	binary.LittleEndian.PutUint64(b, r.GuestAddr)
	binary.LittleEndian.PutUint64(b[8:], r.Size)
	binary.LittleEndian.PutUint64(b[16:], r.UserAddr)
	binary.LittleEndian.PutUint64(b[24:], r.MmapOffset)
}

// ParseMemTable decodes a SET_MEM_TABLE payload.
func ParseMemTable(p []byte) ([]MemRegion, error) {
	if len(p) < 8 {
		return nil, fmt.Errorf("%w: SET_MEM_TABLE payload of %d bytes", ErrProtocol, len(p))
	}
	n := binary.LittleEndian.Uint32(p)
	if n == 0 || n > maxMemRegions {
		return nil, fmt.Errorf("%w: SET_MEM_TABLE with %d regions (1..%d)", ErrProtocol, n, maxMemRegions)
	}
	if len(p) < 8+int(n)*memRegionSize {
		return nil, fmt.Errorf("%w: SET_MEM_TABLE: %d regions in %d bytes", ErrProtocol, n, len(p))
	}
	rs := make([]MemRegion, n)
	for i := range rs {
		rs[i] = parseMemRegion(p[8+i*memRegionSize:])
	}
	return rs, nil
}

// VringAddr is the SET_VRING_ADDR payload.
type VringAddr struct {
	Index, Flags           uint32
	Desc, Used, Avail, Log uint64
}

// ParseVringAddr decodes a SET_VRING_ADDR payload.
func ParseVringAddr(p []byte) (VringAddr, error) {
	if len(p) < vringAddrSize {
		return VringAddr{}, fmt.Errorf("%w: SET_VRING_ADDR payload of %d bytes, want %d", ErrProtocol, len(p), vringAddrSize)
	}
	return VringAddr{
		Index: binary.LittleEndian.Uint32(p),
		Flags: binary.LittleEndian.Uint32(p[4:]),
		Desc:  binary.LittleEndian.Uint64(p[8:]),
		Used:  binary.LittleEndian.Uint64(p[16:]),
		Avail: binary.LittleEndian.Uint64(p[24:]),
		Log:   binary.LittleEndian.Uint64(p[32:]),
	}, nil
}
