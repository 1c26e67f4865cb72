package vhostuser

import (
	"bytes"
	"testing"
)

// TestIovHelpers checks Gather, Scatter and AppendRange against a flat copy of the same bytes for
// every offset and length over a vector with empty and one-byte pieces.
func TestIovHelpers(t *testing.T) {
	flat := []byte("abcdefghijklmnopqrstuvwxyz")
	cuts := []int{0, 3, 3, 4, 10, 26}
	iov := func(b []byte) [][]byte {
		var v [][]byte
		for i := 1; i < len(cuts); i++ {
			v = append(v, b[cuts[i-1]:cuts[i]])
		}
		return v
	}
	src := iov(flat)
	if IovLen(src) != len(flat) {
		t.Fatalf("IovLen %d", IovLen(src))
	}
	for off := 0; off <= len(flat)+2; off++ {
		for n := 0; n <= len(flat)+2; n++ {
			want := flat[min(off, len(flat)):min(off+n, len(flat))]
			dst := make([]byte, n)
			if k := Gather(dst, src, off); !bytes.Equal(dst[:k], want) {
				t.Fatalf("Gather(%d, %d) = %q, want %q", off, n, dst[:k], want)
			}
			if got := bytes.Join(AppendRange(nil, src, off, n), nil); !bytes.Equal(got, want) {
				t.Fatalf("AppendRange(%d, %d) = %q, want %q", off, n, got, want)
			}
			buf := bytes.Repeat([]byte{'.'}, len(flat))
			in := bytes.Repeat([]byte{'#'}, n)
			k := Scatter(iov(buf), off, in)
			wantBuf := bytes.Repeat([]byte{'.'}, len(flat))
			wantK := copy(wantBuf[min(off, len(flat)):], in)
			if k != wantK || !bytes.Equal(buf, wantBuf) {
				t.Fatalf("Scatter(%d, %d) = %d %q, want %d %q", off, n, k, buf, wantK, wantBuf)
			}
		}
	}
}
