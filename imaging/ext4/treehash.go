package ext4

import (
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"runtime"
)

// treeHash is the content hash of an image's input: SHA-256 over consecutive 256 KiB leaves,
// hashed in parallel (up to GOMAXPROCS at once), then SHA-256 over a header, the leaf digests in
// order and the length. A single SHA-256 stream runs at one core's speed (~1.2 GB/s with SHA-NI);
// leaves let a second core share the work. Leaf boundaries depend only on stream offsets, so the
// digest does not depend on how the input was read.
//
// Write copies into the current leaf (cheap while the caller's bytes are in this core's cache).
// One goroutine writes; leaf goroutines end by themselves, so an abandoned treeHash leaks
// nothing. A disabled treeHash (an explicit UUID: nothing derives from the content) hashes
// nothing and Sum returns nil.
type treeHash struct {
	off     bool
	cur     []byte  // the partial leaf, copied from Write
	pending []*leaf // dispatched leaves, oldest first
	free    [][]byte
	root    hash.Hash
	n       uint64
	sem     chan struct{}
}

type leaf struct {
	buf  []byte
	sum  [sha256.Size]byte
	done chan struct{}
}

// leafSize: large enough that a goroutine per leaf costs nothing next to hashing it.
const leafSize = 256 << 10

func newTreeHash(on bool) *treeHash {
	if !on {
		return &treeHash{off: true}
	}
	t := &treeHash{root: sha256.New(), sem: make(chan struct{}, runtime.GOMAXPROCS(0))}
	t.root.Write([]byte("virtkit-ext4 tree-sha256 256KiB\n"))
	return t
}

// maxPending bounds the leaves in flight (and so the memory: 256 KiB each).
func (t *treeHash) maxPending() int { return 2*cap(t.sem) + 2 }

func (t *treeHash) Write(p []byte) (int, error) {
	if t.off {
		return len(p), nil
	}
	n := len(p)
	for len(p) > 0 {
		if t.cur == nil {
			t.cur = t.buffer()
		}
		k := min(len(p), leafSize-len(t.cur))
		t.cur = append(t.cur, p[:k]...)
		p = p[k:]
		if len(t.cur) == leafSize {
			t.dispatch(t.cur)
			t.cur = nil
		}
	}
	return n, nil
}

func (t *treeHash) dispatch(buf []byte) {
	l := &leaf{buf: buf, done: make(chan struct{})}
	t.n += uint64(len(buf))
	t.pending = append(t.pending, l)
	go func() {
		t.sem <- struct{}{}
		l.sum = sha256.Sum256(l.buf)
		<-t.sem
		close(l.done)
	}()
	for len(t.pending) > t.maxPending() {
		t.fold()
	}
}

// fold waits for the oldest pending leaf and adds its digest to the root.
func (t *treeHash) fold() {
	l := t.pending[0]
	t.pending[0] = nil
	t.pending = t.pending[1:]
	<-l.done
	t.root.Write(l.sum[:])
	t.free = append(t.free, l.buf[:0])
}

func (t *treeHash) buffer() []byte {
	if k := len(t.free); k > 0 {
		b := t.free[k-1]
		t.free = t.free[:k-1]
		return b
	}
	return make([]byte, 0, leafSize)
}

// Sum ends the stream (a partial last leaf is hashed as it is) and returns the root digest
// appended to b; nil when disabled. Nothing may be written afterwards.
func (t *treeHash) Sum(b []byte) []byte {
	if t.off {
		return nil
	}
	if len(t.cur) > 0 {
		t.dispatch(t.cur)
		t.cur = nil
	}
	for len(t.pending) > 0 {
		t.fold()
	}
	t.free = nil
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], t.n)
	t.root.Write(n[:])
	return t.root.Sum(b)
}
