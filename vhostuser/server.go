package vhostuser

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Device is the virtio device behind a vhost-user backend.
type Device interface {
	// Features returns the device-specific virtio feature bits. The core adds VERSION_1,
	// INDIRECT_DESC, EVENT_IDX and VHOST_USER_F_PROTOCOL_FEATURES.
	Features() uint64
	// Queues returns how many virtqueues the backend serves.
	Queues() int
	// Config returns the device configuration space (GET_CONFIG), or nil.
	Config() []byte
	// Start hands a running queue to the device. The device serves it (Pop/Push/WaitKick) until
	// Stop for the same index returns.
	Start(q *Queue)
	// Stop must return only once the device no longer touches the queue.
	Stop(index int)
	// Reset is called when the frontend goes away or resets the device: drop all state.
	Reset()
}

// vring is the session's view of one ring before and while it runs.
type vring struct {
	num     uint32
	base    uint16
	addr    *VringAddr
	kickFD  int // -1 none; vringInvalidFD polling is kickFD == -2
	callFD  int
	errFD   int
	enabled bool
	q       *Queue
}

// session is one connected frontend.
type session struct {
	conn  *net.UnixConn
	dev   Device
	log   zerolog.Logger
	nq    int
	rings []*vring
	mem   *Memory
	slots []*region // ADD_MEM_REG bookkeeping (also holds SET_MEM_TABLE regions)

	features, acked    uint64
	protocol           uint64
	owner              bool
	status             uint64
	protocolNegotiated bool
}

// Serve accepts frontends on l one at a time and serves dev to each until ctx ends. A frontend
// that disconnects (or violates the protocol) resets the device; the next connection starts
// afresh, which is how a restarted or reconnecting VMM finds the backend again. Serve closes l
// when ctx ends.
func Serve(ctx context.Context, l *net.UnixListener, dev Device, log zerolog.Logger) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("vhost-user: accept: %w", err)
		}
		err = ServeConn(ctx, c, dev, log)
		if err != nil && ctx.Err() == nil {
			log.Warn().Err(err).Msg("vhost-user frontend session ended")
		} else {
			log.Debug().Msg("vhost-user frontend disconnected")
		}
	}
}

// ServeConn serves one frontend connection until it closes or ctx ends, then resets dev. It
// closes c.
func ServeConn(ctx context.Context, c *net.UnixConn, dev Device, log zerolog.Logger) error {
	s := &session{conn: c, dev: dev, log: log, nq: dev.Queues()}
	s.features = dev.Features() | FeatureVersion1 | FeatureIndirectDesc | FeatureEventIdx | FeatureProtocolFeatures
	for i := 0; i < s.nq; i++ {
		s.rings = append(s.rings, &vring{kickFD: -1, callFD: -1, errFD: -1})
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	defer s.teardown()
	for {
		m, err := ReadMessage(c)
		if err != nil {
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return nil
			}
			return err
		}
		if err := s.handle(m); err != nil {
			return err
		}
	}
}

func (s *session) teardown() {
	s.stopAll()
	s.dev.Reset()
	for _, r := range s.rings {
		closeFD(&r.kickFD)
		closeFD(&r.callFD)
		closeFD(&r.errFD)
	}
	s.mem.unmap()
	s.mem = nil
	s.slots = nil
	s.conn.Close()
}

func closeFD(fd *int) {
	if *fd >= 0 {
		unix.Close(*fd)
	}
	*fd = -1
}

// handle processes one message; an error ends the session.
func (s *session) handle(m *Message) (err error) {
	defer m.closeFDs()
	if m.Flags&flagReply != 0 {
		return fmt.Errorf("%w: %s sent with the reply flag", ErrProtocol, RequestName(m.Request))
	}
	s.log.Trace().Str("req", RequestName(m.Request)).Int("size", len(m.Payload)).Int("fds", len(m.FDs)).Msg("vhost-user message")
	replied := false
	reply := func(p []byte) error {
		replied = true
		return WriteMessage(s.conn, m.Request, flagReply, p)
	}
	var opErr error // a failed request that does not end the session
	switch m.Request {
	case reqGetFeatures:
		err = reply(u64Payload(s.features))
	case reqSetFeatures:
		var v uint64
		if v, err = m.u64(); err == nil {
			if v&^s.features != 0 {
				opErr = fmt.Errorf("SET_FEATURES %#x has bits the backend never offered (%#x)", v, v&^s.features)
				break
			}
			s.acked = v
		}
	case reqGetProtocolFeatures:
		err = reply(u64Payload(protocolFeaturesOffered))
	case reqSetProtocolFeatures:
		var v uint64
		if v, err = m.u64(); err == nil {
			s.protocol = v & protocolFeaturesOffered
			s.protocolNegotiated = true
		}
	case reqSetOwner:
		s.owner = true
	case reqResetOwner, reqResetDevice:
		s.stopAll()
		s.dev.Reset()
		s.acked = 0
		for _, r := range s.rings {
			closeFD(&r.kickFD)
			closeFD(&r.callFD)
			closeFD(&r.errFD)
			*r = vring{kickFD: -1, callFD: -1, errFD: -1}
		}
	case reqGetQueueNum:
		err = reply(u64Payload(uint64(s.nq)))
	case reqGetMaxMemSlots:
		err = reply(u64Payload(maxMemSlots))
	case reqSetMemTable:
		opErr = s.setMemTable(m)
	case reqAddMemReg:
		opErr = s.addMemReg(m)
	case reqRemMemReg:
		opErr = s.remMemReg(m)
	case reqSetVringNum, reqSetVringBase, reqSetVringEnable:
		var idx, num uint32
		if idx, num, err = m.vringState(); err != nil {
			break
		}
		r, rerr := s.ring(idx)
		if rerr != nil {
			opErr = rerr
			break
		}
		switch m.Request {
		case reqSetVringNum:
			if num == 0 || num > maxQueueSize || num&(num-1) != 0 {
				opErr = fmt.Errorf("SET_VRING_NUM %d for ring %d: not a power of two up to %d", num, idx, maxQueueSize)
				break
			}
			r.num = num
		case reqSetVringBase:
			if num > 0xffff {
				opErr = fmt.Errorf("SET_VRING_BASE %d for ring %d: out of range", num, idx)
				break
			}
			r.base = uint16(num)
		case reqSetVringEnable:
			r.enabled = num != 0
			if r.enabled {
				opErr = s.maybeStart(int(idx))
			} else {
				s.stopRing(int(idx))
			}
		}
	case reqSetVringAddr:
		var a VringAddr
		if a, err = ParseVringAddr(m.Payload); err != nil {
			break
		}
		r, rerr := s.ring(a.Index)
		if rerr != nil {
			opErr = rerr
			break
		}
		if a.Flags&1 != 0 {
			opErr = fmt.Errorf("SET_VRING_ADDR ring %d: dirty logging was not offered", a.Index)
			break
		}
		s.stopRing(int(a.Index))
		r.addr = &a
		opErr = s.maybeStart(int(a.Index))
	case reqGetVringBase:
		var idx uint32
		if idx, _, err = m.vringState(); err != nil {
			break
		}
		r, rerr := s.ring(idx)
		if rerr != nil {
			return rerr // the frontend waits for a reply we cannot give
		}
		base := r.base
		if r.q != nil {
			s.stopRing(int(idx))
			base = r.base
		}
		// GET_VRING_BASE stops the ring; kick and call are handed back.
		closeFD(&r.kickFD)
		r.enabled = false
		p := make([]byte, 8)
		binary.LittleEndian.PutUint32(p, idx)
		binary.LittleEndian.PutUint32(p[4:], uint32(base))
		err = reply(p)
	case reqSetVringKick, reqSetVringCall, reqSetVringErr:
		opErr = s.setVringFD(m)
	case reqGetConfig:
		err = s.getConfig(m, reply)
	case reqSetConfig:
		opErr = errors.New("SET_CONFIG: the device configuration is read-only")
	case reqSetStatus:
		var v uint64
		if v, err = m.u64(); err == nil {
			s.status = v
		}
	case reqGetStatus:
		err = reply(u64Payload(s.status))
	case reqSetVringEndian:
		opErr = errors.New("SET_VRING_ENDIAN: only little-endian rings are supported")
	default:
		opErr = fmt.Errorf("%s is not supported", RequestName(m.Request))
	}
	if err != nil {
		return err
	}
	if opErr != nil {
		s.log.Warn().Err(opErr).Str("req", RequestName(m.Request)).Msg("vhost-user request failed")
	}
	if !replied && m.Flags&flagNeedReply != 0 && s.protocol&ProtoReplyAck != 0 {
		var code uint64
		if opErr != nil {
			code = 1
		}
		return reply(u64Payload(code))
	}
	return nil
}

func (s *session) ring(idx uint32) (*vring, error) {
	if idx >= uint32(s.nq) {
		return nil, fmt.Errorf("%w: ring %d out of range (device has %d)", ErrProtocol, idx, s.nq)
	}
	return s.rings[idx], nil
}

func (s *session) setVringFD(m *Message) error {
	v, err := m.u64()
	if err != nil {
		return err
	}
	r, err := s.ring(uint32(v & vringIndexMask))
	if err != nil {
		return err
	}
	idx := int(v & vringIndexMask)
	fd := -1
	if v&vringInvalidFD == 0 {
		if fd, err = m.takeFD(); err != nil {
			return err
		}
	} else if len(m.FDs) != 0 {
		return fmt.Errorf("%w: %s with the no-fd flag carries an fd", ErrProtocol, RequestName(m.Request))
	}
	switch m.Request {
	case reqSetVringKick:
		// A new kick fd restarts the ring with it.
		s.stopRing(idx)
		closeFD(&r.kickFD)
		r.kickFD = fd
		if fd < 0 {
			r.kickFD = -2 // polling mode
		}
		if s.acked&FeatureProtocolFeatures == 0 {
			r.enabled = true // without protocol features a ring starts on its kick
		}
		return s.maybeStart(idx)
	case reqSetVringCall:
		running := r.q != nil
		if running {
			s.stopRing(idx)
		}
		closeFD(&r.callFD)
		r.callFD = fd
		if running {
			return s.maybeStart(idx)
		}
	case reqSetVringErr:
		closeFD(&r.errFD)
		r.errFD = fd
	}
	return nil
}

// maybeStart starts ring idx when it has everything it needs.
func (s *session) maybeStart(idx int) error {
	r := s.rings[idx]
	if r.q != nil || !r.enabled || r.kickFD == -1 || r.addr == nil || r.num == 0 || s.mem == nil {
		return nil
	}
	kick := -1
	if r.kickFD >= 0 {
		var err error
		if kick, err = unix.Dup(r.kickFD); err != nil {
			return fmt.Errorf("ring %d: dup kick fd: %w", idx, err)
		}
		unix.CloseOnExec(kick)
	}
	q, err := newQueue(idx, uint16(r.num), s.mem, *r.addr, r.base, s.acked, kick, r.callFD)
	if err != nil {
		if kick >= 0 {
			unix.Close(kick)
		}
		return err
	}
	r.q = q
	s.log.Debug().Int("ring", idx).Uint32("size", r.num).Uint16("base", r.base).Msg("vhost-user ring started")
	s.dev.Start(q)
	return nil
}

// stopRing stops ring idx, remembering where it got to.
func (s *session) stopRing(idx int) {
	r := s.rings[idx]
	if r.q == nil {
		return
	}
	r.q.close() // unblocks WaitKick
	s.dev.Stop(idx)
	r.base = r.q.lastAvailIdx()
	r.q.release()
	r.q = nil
}

func (s *session) stopAll() {
	for i := range s.rings {
		s.stopRing(i)
	}
}

// restartAll re-translates running rings after the memory table changed.
func (s *session) withRingsStopped(f func() error) error {
	var running []int
	for i, r := range s.rings {
		if r.q != nil {
			running = append(running, i)
			s.stopRing(i)
		}
	}
	err := f()
	for _, i := range running {
		if e := s.maybeStart(i); e != nil && err == nil {
			err = e
		}
	}
	for i := range s.rings { // rings that were only waiting for memory
		if e := s.maybeStart(i); e != nil && err == nil {
			err = e
		}
	}
	return err
}

func (s *session) setMemTable(m *Message) error {
	rs, err := ParseMemTable(m.Payload)
	if err != nil {
		return err
	}
	if len(m.FDs) != len(rs) {
		return fmt.Errorf("%w: SET_MEM_TABLE has %d regions and %d fds", ErrProtocol, len(rs), len(m.FDs))
	}
	fds := m.FDs
	m.FDs = nil
	var mapped []*region
	for i, r := range rs {
		reg, err := mapRegion(fds[i], r)
		if err != nil {
			for _, fd := range fds[i+1:] {
				unix.Close(fd)
			}
			for _, x := range mapped {
				x.unmap()
			}
			return err
		}
		mapped = append(mapped, reg)
	}
	mem, err := newMemory(mapped)
	if err != nil {
		for _, x := range mapped {
			x.unmap()
		}
		return err
	}
	return s.withRingsStopped(func() error {
		s.mem.unmap()
		s.mem, s.slots = mem, mem.regions
		return nil
	})
}

func (s *session) addMemReg(m *Message) error {
	if len(m.Payload) < 8+memRegionSize {
		return fmt.Errorf("%w: ADD_MEM_REG payload of %d bytes", ErrProtocol, len(m.Payload))
	}
	fd, err := m.takeFD()
	if err != nil {
		return err
	}
	if len(s.slots) >= maxMemSlots {
		unix.Close(fd)
		return fmt.Errorf("ADD_MEM_REG: all %d slots used", maxMemSlots)
	}
	reg, err := mapRegion(fd, parseMemRegion(m.Payload[8:]))
	if err != nil {
		return err
	}
	mem, err := newMemory(append(append([]*region(nil), s.slots...), reg))
	if err != nil {
		reg.unmap()
		return err
	}
	return s.withRingsStopped(func() error {
		s.mem, s.slots = mem, mem.regions
		return nil
	})
}

func (s *session) remMemReg(m *Message) error {
	if len(m.Payload) < 8+memRegionSize {
		return fmt.Errorf("%w: REM_MEM_REG payload of %d bytes", ErrProtocol, len(m.Payload))
	}
	r := parseMemRegion(m.Payload[8:])
	for i, x := range s.slots {
		if x.GuestAddr == r.GuestAddr && x.Size == r.Size && x.UserAddr == r.UserAddr {
			rest := append(append([]*region(nil), s.slots[:i]...), s.slots[i+1:]...)
			mem, err := newMemory(rest)
			if err != nil {
				return err
			}
			return s.withRingsStopped(func() error {
				x.unmap()
				s.mem, s.slots = mem, mem.regions
				return nil
			})
		}
	}
	return fmt.Errorf("REM_MEM_REG: no region at %#x+%#x", r.GuestAddr, r.Size)
}

func (s *session) getConfig(m *Message, reply func([]byte) error) error {
	if len(m.Payload) < configHeaderSize {
		return fmt.Errorf("%w: GET_CONFIG payload of %d bytes", ErrProtocol, len(m.Payload))
	}
	off := binary.LittleEndian.Uint32(m.Payload)
	size := binary.LittleEndian.Uint32(m.Payload[4:])
	if size > maxConfigSize || int(size) > len(m.Payload)-configHeaderSize {
		return fmt.Errorf("%w: GET_CONFIG of %d bytes", ErrProtocol, size)
	}
	out := make([]byte, configHeaderSize+int(size))
	copy(out, m.Payload[:configHeaderSize])
	cfg := s.dev.Config()
	if uint64(off) < uint64(len(cfg)) {
		copy(out[configHeaderSize:], cfg[off:])
	}
	return reply(out)
}
