package ext4

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"io"
	"math/rand"
	"testing"
	"testing/iotest"
)

// refTreeSum is the content hash by its definition, written independently of treeHash.
func refTreeSum(data []byte) []byte {
	root := sha256.New()
	root.Write([]byte("virtkit-ext4 tree-sha256 256KiB\n"))
	for off := 0; off < len(data); off += leafSize {
		s := sha256.Sum256(data[off:min(off+leafSize, len(data))])
		root.Write(s[:])
	}
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(len(data)))
	root.Write(n[:])
	return root.Sum(nil)
}

func TestTreeHashIndependentOfWriteBoundaries(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for _, size := range []int{0, 1, leafSize - 1, leafSize, leafSize + 1, 13*leafSize + 4321} {
		data := make([]byte, size)
		rng.Read(data)
		want := refTreeSum(data)

		whole := newTreeHash(true)
		whole.Write(data)
		if got := whole.Sum(nil); !bytes.Equal(got, want) {
			t.Fatalf("size %d, one write: %x, want %x", size, got, want)
		}

		pieces := newTreeHash(true)
		for p := data; len(p) > 0; {
			k := min(len(p), 1+rng.Intn(3*leafSize/2))
			pieces.Write(p[:k])
			p = p[k:]
		}
		if got := pieces.Sum(nil); !bytes.Equal(got, want) {
			t.Fatalf("size %d, random writes: %x, want %x", size, got, want)
		}

		// The tar path: a tee of whatever the reader returns (short reads from a pipe).
		tee := newTreeHash(true)
		got, err := io.ReadAll(io.TeeReader(iotest.HalfReader(bytes.NewReader(data)), tee))
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("size %d: read %d bytes, %v", size, len(got), err)
		}
		if s := tee.Sum(nil); !bytes.Equal(s, want) {
			t.Fatalf("size %d, short reads: %x, want %x", size, s, want)
		}

		if size > 0 {
			data[size/2] ^= 1
			other := newTreeHash(true)
			other.Write(data)
			if bytes.Equal(other.Sum(nil), want) {
				t.Fatalf("size %d: a flipped bit did not change the hash", size)
			}
		}
	}
}

func TestTreeHashDisabled(t *testing.T) {
	h := newTreeHash(false)
	if n, err := h.Write(make([]byte, 3*leafSize)); n != 3*leafSize || err != nil {
		t.Fatalf("Write on a disabled hash: %d, %v", n, err)
	}
	if s := h.Sum(nil); s != nil {
		t.Fatalf("disabled hash summed to %x", s)
	}
}
