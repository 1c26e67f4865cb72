package frame

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
)

func TestReaderRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	frames := [][]byte{make([]byte, MinLen), bytes.Repeat([]byte{7}, 1514), bytes.Repeat([]byte{9}, MaxLen)}
	for _, f := range frames {
		if err := w.Write(f); err != nil {
			t.Fatal(err)
		}
	}
	r := NewReader(&buf, 0)
	for i, want := range frames {
		got, err := r.Next()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("frame %d: got %d bytes, want %d", i, len(got), len(want))
		}
	}
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("after the last frame: %v, want EOF", err)
	}
}

func TestReaderBadLengths(t *testing.T) {
	for _, tc := range []struct {
		in   []byte
		want error
	}{
		{[]byte{0xff, 0xff, 0xff, 0xff}, ErrTooLarge},
		{[]byte{0, 1, 0, 0xe}, ErrTooLarge},
		{[]byte{0, 0, 0, 13}, ErrTooSmall},
		{[]byte{0, 0, 0, 0}, ErrTooSmall},
		{[]byte{0, 0, 0, 20, 1, 2}, io.ErrUnexpectedEOF},
		{[]byte{0, 0}, io.ErrUnexpectedEOF},
	} {
		_, err := NewReader(bytes.NewReader(tc.in), 0).Next()
		if !errors.Is(err, tc.want) {
			t.Errorf("%x: %v, want %v", tc.in, err, tc.want)
		}
	}
}

func TestParseARP(t *testing.T) {
	f := make([]byte, EthHeaderLen+28)
	PutEth(f, Broadcast, MAC{2, 0, 0, 0, 0, 1}, TypeARP)
	copy(f[EthHeaderLen:], []byte{0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1})
	a, err := ParseARP(f)
	if err != nil {
		t.Fatal(err)
	}
	if a.Op != ARPRequest || a.SenderMAC != (MAC{2, 0, 0, 0, 0, 1}) || a.SenderIP != netip.MustParseAddr("10.0.0.2") || a.TargetIP != netip.MustParseAddr("10.0.0.1") {
		t.Errorf("%+v", a)
	}
	if _, err := ParseARP(f[:30]); !errors.Is(err, ErrMalformed) {
		t.Errorf("truncated: %v", err)
	}
}

func TestBuildUDP4(t *testing.T) {
	src := netip.MustParseAddrPort("10.0.0.1:67")
	dst := netip.MustParseAddrPort("10.0.0.2:68")
	f := BuildUDP4(MAC{2, 0, 0, 0, 0, 2}, MAC{2, 0, 0, 0, 0, 1}, src, dst, []byte("hello"))
	ip, p, err := ParseIPv4(f)
	if err != nil {
		t.Fatal(err)
	}
	if ip.Src != src.Addr() || ip.Dst != dst.Addr() || ip.Proto != ProtoUDP {
		t.Errorf("%+v", ip)
	}
	if Checksum(f[EthHeaderLen:EthHeaderLen+20]) != 0 {
		t.Error("bad IPv4 header checksum")
	}
	u, err := ParseUDP(p)
	if err != nil || u.SrcPort != 67 || u.DstPort != 68 || string(u.Payload) != "hello" {
		t.Errorf("%+v %v", u, err)
	}
}

// FuzzReader: any byte stream yields frames within bounds or an error, never a panic.
func FuzzReader(f *testing.F) {
	f.Add([]byte{0, 0, 0, 14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 20, 1})
	f.Add(Append(Append(nil, make([]byte, 60)), make([]byte, 14)))
	f.Add([]byte{0x80, 0, 0, 14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(bytes.NewReader(b), 0)
		if len(b) > 0 && b[len(b)-1]&1 == 1 {
			r.AcceptPartial()
		}
		if len(b) > 0 && b[0]&1 == 1 {
			r.SetAlloc(MinLen+1, func(n int) []byte { return make([]byte, n) })
		}
		total := 0
		for {
			fr, err := r.Next()
			if err != nil {
				return
			}
			if len(fr) < MinLen || len(fr) > MaxLen {
				t.Fatalf("frame of %d bytes", len(fr))
			}
			if r.Partial() {
				// A partial frame's checksum can always be completed or is left alone.
				FixChecksum(fr)
			}
			total += len(fr) + HeaderLen
			if total > len(b) {
				t.Fatalf("read %d bytes from %d", total, len(b))
			}
		}
	})
}

// FuzzPackets runs the ARP, IPv4 and UDP parsers on arbitrary frames.
func FuzzPackets(f *testing.F) {
	f.Add(BuildUDP4(Broadcast, MAC{2}, netip.MustParseAddrPort("0.0.0.0:68"), netip.MustParseAddrPort("255.255.255.255:67"), []byte("x")))
	arp := make([]byte, EthHeaderLen+28)
	PutEth(arp, Broadcast, MAC{2}, TypeARP)
	copy(arp[EthHeaderLen:], []byte{0, 1, 8, 0, 6, 4, 0, 1})
	f.Add(arp)
	f.Add(make([]byte, 34))
	f.Fuzz(func(t *testing.T, b []byte) {
		ParseARP(b)
		ip, p, err := ParseIPv4(b)
		if err != nil {
			return
		}
		if len(p) > len(b) || !ip.Src.Is4() {
			t.Fatalf("payload %d of %d", len(p), len(b))
		}
		if u, err := ParseUDP(p); err == nil && len(u.Payload) > len(p)-8 {
			t.Fatalf("udp payload %d of %d", len(u.Payload), len(p))
		}
	})
}

// slowChecksum is RFC 1071 word by word, the reference for the wide implementation.
func slowChecksum(b []byte, initial uint16) uint16 {
	sum := uint32(initial)
	for len(b) >= 2 {
		sum += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

func FuzzChecksum(f *testing.F) {
	f.Add([]byte{}, uint16(0))
	f.Add(bytes.Repeat([]byte{0xff}, 1000), uint16(0xffff))
	f.Add([]byte{1, 2, 3}, uint16(7))
	f.Fuzz(func(t *testing.T, b []byte, initial uint16) {
		got, want := checksum(b, initial), slowChecksum(b, initial)
		// 0x0000 and 0xffff are the same number in ones' complement.
		if got != want && !(got%0xffff == 0 && want%0xffff == 0) {
			t.Fatalf("checksum(%x, %d) = %#x, want %#x", b, initial, got, want)
		}
	})
}

func TestFixChecksum(t *testing.T) {
	f := BuildUDP4(MAC{2}, MAC{4}, netip.MustParseAddrPort("10.0.0.1:5"), netip.MustParseAddrPort("10.0.0.2:6"), bytes.Repeat([]byte("payload!"), 1000))
	want := append([]byte(nil), f...)
	f[EthHeaderLen+20+6], f[EthHeaderLen+20+7] = 0x12, 0x34 // a partial sum left by "hardware"
	if !FixChecksum(f) || !bytes.Equal(f, want) {
		t.Error("FixChecksum did not restore the UDP checksum")
	}
}

func BenchmarkChecksum(b *testing.B) {
	buf := make([]byte, 65000)
	b.SetBytes(int64(len(buf)))
	for i := 0; i < b.N; i++ {
		checksum(buf, 0)
	}
}

// TestPartialChecksum: a flagged frame is read back as partial only when the reader accepts
// partial checksums, and completing its checksum gives the same frame BuildUDP4 made.
func TestPartialChecksum(t *testing.T) {
	f := BuildUDP4(MAC{2}, MAC{4}, netip.MustParseAddrPort("10.0.0.1:5"), netip.MustParseAddrPort("10.0.0.2:6"), bytes.Repeat([]byte("x"), 3000))
	want := append([]byte(nil), f...)
	start, off, ok := L4Checksum(f)
	if !ok || start != EthHeaderLen+20 || off != 6 {
		t.Fatalf("L4Checksum = %d %d %v", start, off, ok)
	}
	f[start+off], f[start+off+1] = 0xab, 0xcd // whatever the sender left there
	b := make([]byte, HeaderLen+len(f))
	PutHeaderPartial(b, len(f))
	copy(b[HeaderLen:], f)

	if _, err := NewReader(bytes.NewReader(b), 0).Next(); !errors.Is(err, ErrTooLarge) {
		t.Errorf("a reader that did not accept partial frames read one: %v", err)
	}
	r := NewReader(bytes.NewReader(b), 0)
	r.AcceptPartial()
	got, err := r.Next()
	if err != nil || !r.Partial() || len(got) != len(f) {
		t.Fatalf("Next = %d bytes, partial %v, %v", len(got), r.Partial(), err)
	}
	if !FixChecksum(got) || !bytes.Equal(got, want) {
		t.Error("completed checksum differs")
	}
	if !IsHello(Hello(MAC{2})) || IsHelloAck(Hello(MAC{2})) || !IsHelloAck(HelloAck(MAC{2}, MAC{4})) {
		t.Error("control frames not recognised")
	}
}

// chunky returns at most a few bytes per Read, so frames arrive split at every possible place.
type chunky struct {
	b    []byte
	next func() int
}

func (c *chunky) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), len(c.b), c.next())
	copy(p, c.b[:n])
	c.b = c.b[n:]
	return n, nil
}

// testFrames returns frames of every interesting size: small, around the alloc threshold, large.
func testFrames(seed int64) [][]byte {
	rnd := rand.New(rand.NewSource(seed))
	var frames [][]byte
	for _, n := range []int{14, 60, 1514, 4095, 4096, 4097, 9000, 65534, MaxLen, 64, 65000, 70, 30000} {
		f := make([]byte, n)
		rnd.Read(f)
		frames = append(frames, f)
	}
	return frames
}

// TestReaderAlloc: with SetAlloc, frames read whole or straight into allocated memory are the
// same frames, through a plain reader split at random places and through a socket (readv).
func TestReaderAlloc(t *testing.T) {
	frames := testFrames(1)
	var stream []byte
	for _, f := range frames {
		stream = Append(stream, f)
	}
	check := func(t *testing.T, r *Reader) {
		t.Helper()
		allocs := 0
		r.SetAlloc(4096, func(n int) []byte {
			allocs++
			if n > 65536 {
				return nil
			}
			return make([]byte, n)
		})
		direct := 0
		for i, want := range frames {
			got, err := r.Next()
			if err != nil {
				t.Fatalf("frame %d: %v", i, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("frame %d: %d bytes differ from the %d sent", i, len(got), len(want))
			}
			if r.Allocated() {
				direct++
				if len(want) < 4096 {
					t.Fatalf("frame %d of %d bytes was allocated", i, len(want))
				}
			}
		}
		if _, err := r.Next(); err != io.EOF {
			t.Fatalf("after the last frame: %v, want EOF", err)
		}
		if direct == 0 {
			t.Fatalf("no frame was read into allocated memory (%d allocs)", allocs)
		}
	}
	t.Run("chunks", func(t *testing.T) {
		rnd := rand.New(rand.NewSource(2))
		check(t, NewReader(&chunky{b: stream, next: func() int { return 1 + rnd.Intn(9000) }}, 0))
	})
	t.Run("socket", func(t *testing.T) {
		ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			rnd := rand.New(rand.NewSource(3))
			for s := stream; len(s) > 0; {
				n := min(len(s), 1+rnd.Intn(100000))
				if _, err := c.Write(s[:n]); err != nil {
					return
				}
				s = s[n:]
			}
		}()
		c, err := net.Dial("unix", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		r := NewReader(c, 0)
		if r.raw == nil {
			t.Fatal("a unix socket should be read with readv")
		}
		check(t, r)
	})
}

// TestReaderAllocTruncated: a stream that ends inside a frame being read into allocated memory
// is an unexpected EOF.
func TestReaderAllocTruncated(t *testing.T) {
	s := Append(nil, make([]byte, 20000))
	r := NewReader(&chunky{b: s[:10000], next: func() int { return 3000 }}, 0)
	r.SetAlloc(4096, func(n int) []byte { return make([]byte, n) })
	if _, err := r.Next(); err != io.ErrUnexpectedEOF {
		t.Fatalf("Next = %v, want unexpected EOF", err)
	}
}
