package ext4

import (
	"hash"
	"sync"
)

// asyncHash feeds a hash from its own goroutine: Write copies into a pooled buffer and returns,
// so hashing file contents costs a second core instead of the writer's time. Writes are hashed
// in order. Sum waits for everything written; Close ends the goroutine (the owner must call it).
type asyncHash struct {
	h      hash.Hash
	ch     chan []byte
	free   chan []byte
	cur    []byte
	wg     sync.WaitGroup
	closed bool
}

const asyncBuffers = 4

func newAsyncHash(h hash.Hash) *asyncHash {
	a := &asyncHash{h: h, ch: make(chan []byte, asyncBuffers), free: make(chan []byte, asyncBuffers)}
	for i := 0; i < asyncBuffers; i++ {
		a.free <- make([]byte, 0, 1<<20)
	}
	a.cur = <-a.free
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for b := range a.ch {
			a.h.Write(b)
			a.free <- b[:0]
		}
	}()
	return a
}

func (a *asyncHash) Write(p []byte) (int, error) {
	if a.closed {
		return a.h.Write(p)
	}
	n := len(p)
	for len(p) > 0 {
		k := min(len(p), cap(a.cur)-len(a.cur))
		a.cur = append(a.cur, p[:k]...)
		p = p[k:]
		if len(a.cur) == cap(a.cur) {
			a.ch <- a.cur
			a.cur = <-a.free
		}
	}
	return n, nil
}

// Sum waits until everything written is hashed and appends the hash to b. Later writes are
// hashed synchronously.
func (a *asyncHash) Sum(b []byte) []byte {
	a.Close()
	return a.h.Sum(b)
}

// Close hashes what is buffered and ends the goroutine; it may be called more than once.
func (a *asyncHash) Close() {
	if a.closed {
		return
	}
	a.closed = true
	if len(a.cur) > 0 {
		a.ch <- a.cur
	}
	close(a.ch)
	a.wg.Wait()
}

func (a *asyncHash) Reset()         { a.Close(); a.h.Reset() }
func (a *asyncHash) Size() int      { return a.h.Size() }
func (a *asyncHash) BlockSize() int { return a.h.BlockSize() }
