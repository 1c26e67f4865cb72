package virtiofs

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/rs/zerolog"
)

// FuzzFUSERequest hands arbitrary FUSE requests to a session (the fast path, or go-fuse's decoder,
// over our pass-through file system) whose share holds a file, a directory, a symlink to a host file and
// an open handle: nothing may panic, and nothing outside the share may change or be read.
func FuzzFUSERequest(f *testing.F) {
	req := fuseReq
	f.Add(req(1, 1, []byte("f\x00")))                                     // LOOKUP
	f.Add(req(1, 3, []byte("passwd\x00")))                                // LOOKUP through the symlink node
	f.Add(req(14, 4, le(0)))                                              // OPEN of the symlink
	f.Add(req(15, 2, le(1, 0, 4096, 0, 0)))                               // READ
	f.Add(req(16, 2, append(le(1, 0, 5, 0, 0), "hello"...)))              // WRITE
	f.Add(req(13, 1, append(le(4), "l\x00"...)))                          // LINK of the symlink
	f.Add(req(12, 1, append(le(3), "d\x00x\x00"...)))                     // RENAME
	f.Add(req(9, 1, append(le(0o755), "../up\x00"...)))                   // MKDIR ..
	f.Add(req(8, 1, append(le(0o20666, 0x103), "null\x00"...)))           // MKNOD chr
	f.Add(req(6, 1, []byte("/etc/passwd\x00s2\x00")))                     // SYMLINK
	f.Add(req(28, 1, le(1, 0, 4096, 0, 0)))                               // READDIR with a file handle
	f.Add(req(4, 2, le(1<<3, 0, 0, 0, 0, 0, 0, 0)))                       // SETATTR size
	f.Add(req(2, 2, le(1<<40)))                                           // FORGET
	f.Add(req(42, 1, le(0)))                                              // BATCH_FORGET
	f.Add(req(32, 2, le(1, 0xdeadbeef, 0, 1<<63-1, 1, 0, 0)))             // SETLK
	f.Add(req(47, 2, le(1, 0, 2, 1, 0, 100, 0)))                          // COPY_FILE_RANGE
	f.Add([]byte{0xff, 0xff})                                             // truncated
	f.Add(req(16, 2, append(le(1, 0, 1<<30, 0, 0), make([]byte, 16)...))) // WRITE claiming 1 GiB
	outside := f.TempDir()
	secret := filepath.Join(outside, "secret")
	os.WriteFile(secret, []byte("host secret"), 0o600)
	f.Fuzz(func(t *testing.T, in []byte) {
		share := t.TempDir()
		os.WriteFile(filepath.Join(share, "f"), []byte("inside"), 0o644)
		os.Mkdir(filepath.Join(share, "d"), 0o755)
		os.Symlink(outside, filepath.Join(share, "out"))
		os.Symlink(secret, filepath.Join(share, "s"))
		s, err := newSession(Config{Socket: "unused", SharedDir: share, Xattr: true, Logger: zerolog.Nop()})
		if err != nil {
			t.Fatal(err)
		}
		defer s.close()
		out := make([]byte, 1<<16)
		fp := new(fastPath)
		do := func(b []byte) []byte {
			n, _ := s.handle(fp, [][]byte{b}, [][]byte{out})
			return out[:n]
		}
		mustOK := func(r []byte, what string) {
			if len(r) < 16 || int32(binary.LittleEndian.Uint32(r[4:])) != 0 {
				t.Fatalf("set-up %s failed: %x", what, r)
			}
		}
		mustOK(do(initReq()), "INIT")
		// Node 2 = f, 3 = out, 4 = s; handle 1 = f opened read-write.
		for i, name := range []string{"f", "out", "s"} {
			r := do(req(1, 1, []byte(name+"\x00")))
			mustOK(r, "LOOKUP "+name)
			if id := binary.LittleEndian.Uint64(r[16:]); id != uint64(i+2) {
				t.Fatalf("%s is node %d", name, id)
			}
		}
		r := do(req(14, 2, le(uint64(os.O_RDWR))))
		mustOK(r, "OPEN")
		if fh := binary.LittleEndian.Uint64(r[16:]); fh != 1 {
			t.Fatalf("handle %d", fh)
		}
		if len(in) >= 40 {
			binary.LittleEndian.PutUint32(in, uint32(len(in))) // a wrong length only fails the request
		}
		reply := do(in)
		if bytes.Contains(reply, []byte("host secret")) {
			t.Fatalf("a host file's contents reached the guest: %q", reply)
		}
		if b, err := os.ReadFile(secret); err != nil || string(b) != "host secret" {
			t.Fatalf("host file changed: %q %v", b, err)
		}
		if es, _ := os.ReadDir(outside); len(es) != 1 {
			t.Fatalf("something was created outside the share: %v", es)
		}
	})
}

// FuzzFastPath sends arbitrary requests to two sessions on twin shares after the same set-up,
// one through go-fuse and one through the fast path (go-fuse when it passes): the replies, inode
// numbers and times aside, and the shares' contents must not differ.
func FuzzFastPath(f *testing.F) {
	for _, r := range [][]byte{
		fuseReq(opLookup, 1, []byte("f\x00")),
		fuseReq(opGetattr, 2, le(0, 0)),
		fuseReq(opRead, 2, le(1, 0, 4096, 0, 0)),
		fuseReq(opWrite, 2, append(le(1, 0, 5, 0, 0), "hello"...)),
		fuseReq(opCreate, 1, append(le(uint64(os.O_RDWR)|0o644<<32, 0o22), "n\x00"...)),
		fuseReq(opUnlink, 1, []byte("f\x00")),
		fuseReq(opFlush, 2, le(1, 0, 0)),
		fuseReq(opRelease, 2, le(1, 0, 0)),
		fuseReq(opForget, 2, le(1)),
		fuseReq(opOpen, 3, le(0)),
	} {
		f.Add(r, uint16(4096), uint8(0))
	}
	f.Fuzz(func(t *testing.T, in []byte, outLen uint16, cut uint8) {
		dirs, ss := twinShares(t)
		fp := new(fastPath)
		var n [2]int
		outs := [2][]byte{make([]byte, outLen), make([]byte, outLen)}
		for i, s := range ss {
			var fpi *fastPath
			if i == 1 {
				fpi = fp
			}
			// Node 2 = f, opened read-write as handle 1, as the seeds expect.
			s.handle(fpi, [][]byte{fuseReq(opLookup, 1, []byte("f\x00"))}, [][]byte{make([]byte, 4096)})
			s.handle(fpi, [][]byte{fuseReq(opOpen, 2, le(uint64(os.O_RDWR)))}, [][]byte{make([]byte, 4096)})
			req := slices.Clone(in)
			if len(req) >= inHeaderSize {
				binary.LittleEndian.PutUint32(req, uint32(len(req)))
			}
			n[i], _ = s.handle(fpi, split(req, min(int(cut), len(req))), split(outs[i], min(int(cut)/2, len(outs[i]))))
		}
		op := uint32(0)
		if len(in) >= 8 {
			op = binary.LittleEndian.Uint32(in[4:])
		}
		if a, b := masked(op, outs[0][:n[0]]), masked(op, outs[1][:n[1]]); !bytes.Equal(a, b) {
			t.Fatalf("go-fuse replied\n%x\nthe fast path\n%x", a, b)
		}
		for _, name := range []string{"f", "n", "d"} {
			a, errA := os.ReadFile(filepath.Join(dirs[0], name))
			b, errB := os.ReadFile(filepath.Join(dirs[1], name))
			if !bytes.Equal(a, b) || (errA == nil) != (errB == nil) {
				t.Fatalf("%s differs: %q %v / %q %v", name, a, errA, b, errB)
			}
		}
	})
}
