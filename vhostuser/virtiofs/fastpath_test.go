package virtiofs

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// fuseReq builds a FUSE request: header (length, opcode, unique 7, node) and body.
func fuseReq(op uint32, node uint64, body []byte) []byte {
	b := make([]byte, inHeaderSize, inHeaderSize+len(body))
	binary.LittleEndian.PutUint32(b, uint32(inHeaderSize+len(body)))
	binary.LittleEndian.PutUint32(b[4:], op)
	binary.LittleEndian.PutUint64(b[8:], 7)
	binary.LittleEndian.PutUint64(b[16:], node)
	return append(b, body...)
}

// le encodes little-endian uint64s.
func le(vs ...uint64) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b
}

// initReq is a FUSE_INIT from a 7.31 kernel offering every flag.
func initReq() []byte {
	body := make([]byte, 64)
	binary.LittleEndian.PutUint32(body, 7)
	binary.LittleEndian.PutUint32(body[4:], 31)
	binary.LittleEndian.PutUint32(body[8:], 1<<20)
	binary.LittleEndian.PutUint32(body[12:], 0xffffffff)
	return fuseReq(opInit, 0, body)
}

// twinShares makes two shares with the same contents and an initialised session on each.
func twinShares(t testing.TB) (dirs [2]string, ss [2]*session) {
	for i := range dirs {
		dirs[i] = t.TempDir()
		os.WriteFile(filepath.Join(dirs[i], "f"), []byte("0123456789abcdef"), 0o644)
		os.Mkdir(filepath.Join(dirs[i], "d"), 0o755)
		os.Symlink("/etc/passwd", filepath.Join(dirs[i], "s"))
		s, err := newSession(Config{Socket: "unused", SharedDir: dirs[i], Logger: zerolog.Nop()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.close)
		out := make([]byte, 4096)
		if n, _ := s.handle(nil, [][]byte{initReq()}, [][]byte{out}); n < outHeaderSize || out[4] != 0 {
			t.Fatalf("INIT: %x", out[:n])
		}
		if !s.fast.Load() {
			t.Fatal("fast path not enabled by a successful INIT")
		}
		ss[i] = s
	}
	return dirs, ss
}

// masked blanks what differs between two shares with the same contents in a reply to op: inode
// numbers and times in the attributes.
func masked(op uint32, r []byte) []byte {
	r = slices.Clone(r)
	attrAt := map[uint32]int{opLookup: 16 + 40, opCreate: 16 + 40, opGetattr: 16 + 16}
	if at, ok := attrAt[op]; ok && len(r) >= at+64 && binary.LittleEndian.Uint32(r[4:]) == 0 {
		clear(r[at : at+8])     // ino
		clear(r[at+24 : at+60]) // atime, mtime, ctime and their nanoseconds
	}
	return r
}

// split cuts b into pieces at the given offsets, as a guest's descriptors would.
func split(b []byte, at ...int) [][]byte {
	var iov [][]byte
	prev := 0
	for _, a := range at {
		iov = append(iov, b[prev:a])
		prev = a
	}
	return append(iov, b[prev:])
}

// TestFastPathMatchesGoFuse sends the same requests to two sessions on twin shares, one answered
// by go-fuse's protocol server and one by the fast path, and wants the same replies (inode
// numbers and times aside), the same share contents afterwards, and the fast path to pass on
// what it must leave to go-fuse, untouched.
func TestFastPathMatchesGoFuse(t *testing.T) {
	dirs, ss := twinShares(t)
	fp := new(fastPath)
	long := strings.Repeat("n", 600)
	extended := fuseReq(opLookup, 1, []byte("f\x00"))
	binary.LittleEndian.PutUint16(extended[36:], 1) // TotalExtlen: one 8-byte extension unit
	cases := []struct {
		name   string
		req    []byte
		inCut  []int // readable descriptor boundaries
		outLen int   // writable bytes
		outCut []int
		fast   bool // the fast path must answer it
	}{
		{"lookup f", fuseReq(opLookup, 1, []byte("f\x00")), nil, 4096, nil, true},
		{"lookup without NUL", fuseReq(opLookup, 1, []byte("d")), nil, 4096, nil, true},
		{"lookup missing", fuseReq(opLookup, 1, []byte("nope\x00")), nil, 4096, nil, true},
		{"lookup dotdot", fuseReq(opLookup, 1, []byte("..\x00")), nil, 4096, nil, true},
		{"lookup symlink", fuseReq(opLookup, 1, []byte("s\x00")), []int{41}, 4096, []int{16}, true},
		{"lookup in unknown node", fuseReq(opLookup, 99, []byte("f\x00")), nil, 4096, nil, true},
		{"getattr f", fuseReq(opGetattr, 2, le(0, 0)), nil, 4096, nil, true},
		{"getattr unknown node", fuseReq(opGetattr, 1234, le(0, 0)), nil, 4096, nil, true},
		{"open f", fuseReq(opOpen, 2, le(uint64(os.O_RDWR))), nil, 4096, nil, true},
		{"open symlink", fuseReq(opOpen, 4, le(0)), nil, 4096, nil, true},
		{"read split reply", fuseReq(opRead, 2, le(1, 2, 100, 0, 0)), nil, 16 + 100, []int{16, 20}, true},
		{"read unknown handle", fuseReq(opRead, 2, le(77, 0, 10, 0, 0)), nil, 4096, nil, true},
		{"write split", fuseReq(opWrite, 2, append(le(1, 3, 5, 0, 0), "hello"...)), []int{40, 82}, 4096, nil, true},
		{"write empty", fuseReq(opWrite, 2, le(1, 0, 0, 0, 0)), nil, 4096, nil, true},
		{"write unknown handle", fuseReq(opWrite, 2, append(le(9, 0, 1, 0, 0), 'x')), nil, 4096, nil, true},
		{"read back", fuseReq(opRead, 2, le(1, 0, 4096, 0, 0)), nil, 16 + 4096, nil, true},
		{"flush", fuseReq(opFlush, 2, le(1, 0, 0)), nil, 4096, nil, true},
		{"flush unknown handle", fuseReq(opFlush, 2, le(5, 0, 0)), nil, 4096, nil, true},
		{"create", fuseReq(opCreate, 1, append(le(uint64(os.O_RDWR)|0o644<<32, 0o22), "new\x00"...)), nil, 4096, nil, true},
		{"create existing", fuseReq(opCreate, 1, append(le(uint64(os.O_RDWR)|0o644<<32, 0o22), "new\x00"...)), nil, 4096, nil, true},
		{"create dotdot", fuseReq(opCreate, 1, append(le(uint64(os.O_RDWR)|0o644<<32, 0), "../x\x00"...)), nil, 4096, nil, true},
		{"create fifo mode", fuseReq(opCreate, 1, append(le(uint64(os.O_RDWR)|0o10644<<32, 0), "p\x00"...)), nil, 4096, nil, true},
		{"release", fuseReq(opRelease, 3, le(2, 0, 0)), nil, 4096, nil, true},
		{"unlink", fuseReq(opUnlink, 1, []byte("new\x00")), nil, 4096, nil, true},
		{"unlink again", fuseReq(opUnlink, 1, []byte("new\x00")), nil, 4096, nil, true},
		{"unlink dir", fuseReq(opUnlink, 1, []byte("d\x00")), nil, 4096, nil, true},
		{"forget", fuseReq(opForget, 3, le(1)), nil, 0, nil, true},
		// Left to go-fuse:
		{"getattr reply too small", fuseReq(opGetattr, 2, le(0, 0)), nil, 40, nil, false},
		{"read reply too small", fuseReq(opRead, 2, le(1, 0, 4096, 0, 0)), nil, 100, nil, false},
		{"create cut short", fuseReq(opCreate, 1, le(uint64(os.O_RDWR))), nil, 4096, nil, false},
		{"getattr cut short", fuseReq(opGetattr, 2, nil), nil, 4096, nil, false},
		{"poll hack name", fuseReq(opLookup, 1, []byte(pollHackName+"\x00")), nil, 4096, nil, false},
		{"poll hack inode", fuseReq(opGetattr, pollHackInode, le(0, 0)), nil, 4096, nil, false},
		{"extension", extended, nil, 4096, nil, false},
		{"name beyond the buffer", fuseReq(opLookup, 1, []byte(long+"\x00")), nil, 4096, nil, false},
		{"rename", fuseReq(12, 1, append(le(1), "nope\x00g\x00"...)), nil, 4096, nil, false},
		{"truncated header", []byte{1, 2, 3}, nil, 4096, nil, false},
	}
	for _, c := range cases {
		outs := [2][]byte{make([]byte, c.outLen), make([]byte, c.outLen)}
		// go-fuse on share 0.
		n0, _ := ss[0].ps.HandleRequest(split(slices.Clone(c.req), c.inCut...), split(outs[0], c.outCut...))
		// The fast path on share 1, go-fuse when it passes.
		in1 := split(slices.Clone(c.req), c.inCut...)
		n1, fast := fp.serve(ss[1].raw, in1, split(outs[1], c.outCut...))
		if !fast {
			n1, _ = ss[1].ps.HandleRequest(in1, split(outs[1], c.outCut...))
		}
		if fast != c.fast {
			t.Errorf("%s: fast path answered: %v, want %v", c.name, fast, c.fast)
		}
		op := uint32(0)
		if len(c.req) >= 8 {
			op = binary.LittleEndian.Uint32(c.req[4:])
		}
		if a, b := masked(op, outs[0][:n0]), masked(op, outs[1][:n1]); !bytes.Equal(a, b) {
			t.Errorf("%s: go-fuse replied\n%x\nthe fast path\n%x", c.name, a, b)
		}
	}
	for _, name := range []string{"f", "new", "d", "p", "x"} {
		a, errA := os.ReadFile(filepath.Join(dirs[0], name))
		b, errB := os.ReadFile(filepath.Join(dirs[1], name))
		if !bytes.Equal(a, b) || (errA == nil) != (errB == nil) {
			t.Errorf("%s differs: %q %v / %q %v", name, a, errA, b, errB)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(dirs[1], "f")); string(b) != "012hello89abcdef" {
		t.Errorf("f after the write: %q", b)
	}
}

// TestFastPathNeedsInit: before FUSE_INIT, and with tracing on, every request goes to go-fuse.
func TestFastPathNeedsInit(t *testing.T) {
	for _, trace := range []bool{false, true} {
		s, err := newSession(Config{Socket: "unused", SharedDir: t.TempDir(), Logger: zerolog.Nop(), Trace: trace})
		if err != nil {
			t.Fatal(err)
		}
		defer s.close()
		out := make([]byte, 4096)
		fp := new(fastPath)
		s.handle(fp, [][]byte{fuseReq(opGetattr, 1, le(0, 0))}, [][]byte{out})
		if s.fast.Load() {
			t.Fatal("fast path on before FUSE_INIT")
		}
		s.handle(fp, [][]byte{initReq()}, [][]byte{out})
		if s.fast.Load() == trace {
			t.Fatalf("trace %v: fast path on = %v after FUSE_INIT", trace, s.fast.Load())
		}
	}
}

// BenchmarkFastPath measures a GETATTR through the fast path and through go-fuse, and the
// allocations of each.
func BenchmarkFastPath(b *testing.B) {
	_, ss := twinShares(b)
	req := fuseReq(opGetattr, 1, le(0, 0))
	out := make([]byte, 4096)
	in, o := [][]byte{req}, [][]byte{out}
	b.Run("fast", func(b *testing.B) {
		fp := new(fastPath)
		b.ReportAllocs()
		for b.Loop() {
			if _, ok := fp.serve(ss[0].raw, in, o); !ok {
				b.Fatal("not answered")
			}
		}
	})
	b.Run("go-fuse", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			ss[0].ps.HandleRequest(in, o)
		}
	})
}
