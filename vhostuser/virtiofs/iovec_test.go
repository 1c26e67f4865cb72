package virtiofs

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// splitRandom cuts b into pieces of random sizes (some empty), as a guest's descriptors may.
func splitRandom(r *rand.Rand, b []byte, max int) [][]byte {
	var out [][]byte
	for len(b) > 0 {
		n := min(len(b), r.IntN(max+1))
		out = append(out, b[:n])
		b = b[n:]
	}
	return out
}

// TestPreadvPwritev: reads and writes through preadv/pwritev match a flat read and write of the
// same range, for buffers in adjacent pieces (merged), in pieces apart (not), with empty pieces,
// and with more pieces than the kernel takes in one call.
func TestPreadvPwritev(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		name     string
		size     int
		maxPiece int
		apart    bool // each piece in its own allocation, not adjacent to the next
	}{
		{"pages", 1 << 20, 4096, false},
		{"pages-apart", 1 << 20, 4096, true},
		{"small-pieces", 64 << 10, 7, false},
		{"past-iov-max", 300 << 10, 200, true},
		{"empty", 0, 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := make([]byte, tc.size)
			for i := range data {
				data[i] = byte(r.Uint32())
			}
			pieces := splitRandom(r, data, tc.maxPiece)
			if tc.apart {
				for i, p := range pieces {
					c := make([]byte, len(p), len(p)+64)
					copy(c, p)
					pieces[i] = c
				}
			}
			off := int64(r.IntN(1 << 20))
			n, err := pwritev(int(f.Fd()), pieces, off)
			if err != nil || n != len(data) {
				t.Fatalf("pwritev: %d, %v; want %d", n, err, len(data))
			}
			got := make([]byte, len(data))
			if _, err := f.ReadAt(got, off); err != nil && len(data) > 0 {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("file differs from what pwritev was given")
			}
			dst := make([]byte, len(data))
			into := splitRandom(r, dst, tc.maxPiece)
			if tc.apart {
				for i, p := range into {
					into[i] = make([]byte, len(p))
				}
			}
			n, err = preadv(int(f.Fd()), into, off)
			if err != nil || n != len(data) {
				t.Fatalf("preadv: %d, %v; want %d", n, err, len(data))
			}
			if !bytes.Equal(bytes.Join(into, nil), data) {
				t.Fatal("preadv filled the buffers with something else")
			}
		})
	}
	// A read past the end is short and stops there.
	st, _ := f.Stat()
	buf := [][]byte{make([]byte, 10), make([]byte, 10)}
	if n, err := preadv(int(f.Fd()), buf, st.Size()-5); err != nil || n != 5 {
		t.Fatalf("read across the end: %d, %v; want 5", n, err)
	}
	if _, err := preadv(-1, buf, 0); err == nil {
		t.Fatal("preadv on a bad fd: no error")
	}
}

// TestPreadvNoGarbage: a 256-piece read allocates nothing once the pool is warm.
func TestPreadvNoGarbage(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(1 << 20)
	pieces := make([][]byte, 256)
	for i := range pieces {
		pieces[i] = make([]byte, 4096, 4096+8) // apart: no merging
	}
	if a := testing.AllocsPerRun(100, func() { preadv(int(f.Fd()), pieces, 0) }); a > 0 {
		t.Fatalf("%v allocations per 256-piece preadv", a)
	}
}

// TestAppendIovecsMerges: adjacent pieces become one iovec, others stay apart.
func TestAppendIovecsMerges(t *testing.T) {
	b := make([]byte, 100)
	iov := appendIovecs(nil, [][]byte{b[0:10], b[10:30], {}, b[30:40], b[50:60], b[60:100]})
	if len(iov) != 2 || iov[0].Len != 40 || iov[1].Len != 50 || iov[1].Base != &b[50] {
		t.Fatalf("iovecs %+v", iov)
	}
}
