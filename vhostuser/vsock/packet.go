package vsock

import (
	"encoding/binary"
	"fmt"
)

// virtio-vsock packet header (struct virtio_vsock_hdr, little-endian, 44 bytes).
const (
	hdrSize = 44

	typeStream = 1

	opRequest       = 1
	opResponse      = 2
	opRST           = 3
	opShutdown      = 4
	opRW            = 5
	opCreditUpdate  = 6
	opCreditRequest = 7

	shutdownRcv  = 1
	shutdownSend = 2

	hostCID = 2 // VMADDR_CID_HOST

	// maxPayload bounds one guest packet; Linux never sends more than 64 KiB per packet.
	maxPayload = 64 << 10
)

// header is a decoded virtio_vsock_hdr.
type header struct {
	SrcCID, DstCID   uint64
	SrcPort, DstPort uint32
	Len              uint32
	Type, Op         uint16
	Flags            uint32
	BufAlloc, FwdCnt uint32
}

func (h *header) put(b []byte) {
	binary.LittleEndian.PutUint64(b, h.SrcCID)
	binary.LittleEndian.PutUint64(b[8:], h.DstCID)
	binary.LittleEndian.PutUint32(b[16:], h.SrcPort)
	binary.LittleEndian.PutUint32(b[20:], h.DstPort)
	binary.LittleEndian.PutUint32(b[24:], h.Len)
	binary.LittleEndian.PutUint16(b[28:], h.Type)
	binary.LittleEndian.PutUint16(b[30:], h.Op)
	binary.LittleEndian.PutUint32(b[32:], h.Flags)
	binary.LittleEndian.PutUint32(b[36:], h.BufAlloc)
	binary.LittleEndian.PutUint32(b[40:], h.FwdCnt)
}

// parseHeader decodes a header; b must hold at least hdrSize bytes.
func parseHeader(b []byte) (header, error) {
	if len(b) < hdrSize {
		return header{}, fmt.Errorf("vsock: packet header of %d bytes, want %d", len(b), hdrSize)
	}
	h := header{
		SrcCID:   binary.LittleEndian.Uint64(b),
		DstCID:   binary.LittleEndian.Uint64(b[8:]),
		SrcPort:  binary.LittleEndian.Uint32(b[16:]),
		DstPort:  binary.LittleEndian.Uint32(b[20:]),
		Len:      binary.LittleEndian.Uint32(b[24:]),
		Type:     binary.LittleEndian.Uint16(b[28:]),
		Op:       binary.LittleEndian.Uint16(b[30:]),
		Flags:    binary.LittleEndian.Uint32(b[32:]),
		BufAlloc: binary.LittleEndian.Uint32(b[36:]),
		FwdCnt:   binary.LittleEndian.Uint32(b[40:]),
	}
	if h.Len > maxPayload {
		return h, fmt.Errorf("vsock: packet payload of %d bytes exceeds %d", h.Len, maxPayload)
	}
	return h, nil
}

func opName(op uint16) string {
	switch op {
	case opRequest:
		return "REQUEST"
	case opResponse:
		return "RESPONSE"
	case opRST:
		return "RST"
	case opShutdown:
		return "SHUTDOWN"
	case opRW:
		return "RW"
	case opCreditUpdate:
		return "CREDIT_UPDATE"
	case opCreditRequest:
		return "CREDIT_REQUEST"
	}
	return fmt.Sprintf("OP_%d", op)
}
