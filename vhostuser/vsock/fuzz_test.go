package vsock

import (
	"testing"
)

func FuzzParseConnect(f *testing.F) {
	for _, s := range []string{"CONNECT 1024\n", "CONNECT 4294967295\r\n", "CONNECT -1\n", "HELLO\n", "CONNECT \n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := parseConnect(s)
		if err == nil && len(s) < len("CONNECT 0") {
			t.Fatalf("accepted %q as port %d", s, p)
		}
	})
}

func FuzzParsePacketHeader(f *testing.F) {
	h := header{SrcCID: 3, DstCID: 2, SrcPort: 1, DstPort: 2, Len: 10, Type: typeStream, Op: opRW, BufAlloc: 4096}
	b := make([]byte, hdrSize)
	h.put(b)
	f.Add(b)
	f.Add(make([]byte, 10))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHeader(b)
		if err != nil {
			return
		}
		if h.Len > maxPayload {
			t.Fatalf("payload %d accepted", h.Len)
		}
		out := make([]byte, hdrSize)
		h.put(out)
		if string(out) != string(b[:hdrSize]) {
			t.Fatal("header does not round-trip")
		}
	})
}

// FuzzTXPackets sends arbitrary packets from the guest (with and without the right CIDs); the
// backend must neither crash nor break its queues.
func FuzzTXPackets(f *testing.F) {
	f.Add(uint16(opRequest), uint16(typeStream), uint32(1), uint32(5000), uint32(0), []byte{})
	f.Add(uint16(opRW), uint16(typeStream), uint32(1), uint32(5000), uint32(3), []byte("abc"))
	f.Add(uint16(opShutdown), uint16(typeStream), uint32(7), uint32(1), uint32(3), []byte{})
	f.Add(uint16(99), uint16(2), uint32(0), uint32(0), uint32(0xffffffff), []byte{1})
	r := newRig(f, 0, nil)
	f.Fuzz(func(t *testing.T, op, typ uint16, sport, dport, flags uint32, data []byte) {
		if len(data) > 60<<10 {
			data = data[:60<<10]
		}
		r.g.send(header{SrcPort: sport, DstPort: dport, Op: op, Flags: flags, BufAlloc: 4096}, data)
		r.g.txCh <- packet{h: header{SrcCID: testCID, DstCID: hostCID, SrcPort: sport, DstPort: dport, Type: typ, Op: op, Flags: flags}, data: data}
		r.b.dev.mu.Lock()
		tx := r.b.dev.tx
		r.b.dev.mu.Unlock()
		if tx == nil || tx.q.Broken() != nil {
			t.Fatal("TX queue broken by well-formed descriptors")
		}
	})
}
