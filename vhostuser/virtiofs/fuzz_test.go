package virtiofs

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"
)

// FuzzFUSERequest hands arbitrary FUSE requests to a session (go-fuse's decoder over our
// pass-through file system) whose share holds a file, a directory, a symlink to a host file and
// an open handle: nothing may panic, and nothing outside the share may change or be read.
func FuzzFUSERequest(f *testing.F) {
	req := func(op uint32, node uint64, body []byte) []byte {
		b := make([]byte, 40+len(body))
		binary.LittleEndian.PutUint32(b, uint32(len(b)))
		binary.LittleEndian.PutUint32(b[4:], op)
		binary.LittleEndian.PutUint64(b[8:], 7)
		binary.LittleEndian.PutUint64(b[16:], node)
		return append(b[:40], body...)
	}
	le := func(vs ...uint64) []byte {
		var b []byte
		for _, v := range vs {
			b = binary.LittleEndian.AppendUint64(b, v)
		}
		return b
	}
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
		do := func(b []byte) []byte {
			n, _ := s.ps.HandleRequest([][]byte{b}, [][]byte{out})
			return out[:n]
		}
		init := make([]byte, 64)
		binary.LittleEndian.PutUint32(init, 7)
		binary.LittleEndian.PutUint32(init[4:], 31)
		binary.LittleEndian.PutUint32(init[8:], 1<<20)
		binary.LittleEndian.PutUint32(init[12:], 0xffffffff)
		mustOK := func(r []byte, what string) {
			if len(r) < 16 || int32(binary.LittleEndian.Uint32(r[4:])) != 0 {
				t.Fatalf("set-up %s failed: %x", what, r)
			}
		}
		mustOK(do(req(26, 0, init)), "INIT")
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
