package rootfs

import (
	"context"
	"encoding/hex"
	"hash"
	"io"
	"sync"
	"sync/atomic"
)

// aheadReader reads its source on its own goroutine, a few chunks ahead of its consumer, and
// feeds every byte read to a hash (when it has one) on a third goroutine. Put behind a
// decompressor, it keeps gzip (the one step of a conversion that cannot be split) alone on its
// core while the digest, the tar parsing and the writer run on the other. At most aheadBuffers
// chunks are in flight, which bounds its memory.
type aheadReader struct {
	out  chan *achunk
	free chan []byte
	stop chan struct{}
	wg   sync.WaitGroup
	h    hash.Hash
	skip atomic.Bool // stop hashing: the digest is not wanted after all
	ctx  context.Context
	cur  *achunk
	off  int
	err  error
}

type achunk struct {
	buf    []byte
	err    error
	hashed chan struct{}
}

const (
	aheadBuffers = 8
	aheadChunk   = 256 << 10
)

func newAheadReader(ctx context.Context, r io.Reader, h hash.Hash) *aheadReader {
	a := &aheadReader{
		out:  make(chan *achunk, aheadBuffers),
		free: make(chan []byte, aheadBuffers),
		stop: make(chan struct{}),
		h:    h,
		ctx:  ctx,
	}
	for i := 0; i < aheadBuffers; i++ {
		a.free <- make([]byte, aheadChunk)
	}
	toHash := make(chan *achunk, aheadBuffers)
	a.wg.Add(2)
	go func() { // reader: ends at EOF, on a read error, on Close or when ctx ends
		defer a.wg.Done()
		defer close(a.out)
		defer close(toHash)
		for {
			var buf []byte
			select {
			case buf = <-a.free:
			case <-a.stop:
				return
			case <-ctx.Done():
				return
			}
			n, err := io.ReadFull(r, buf)
			if err == io.ErrUnexpectedEOF {
				err = io.EOF
			}
			c := &achunk{buf: buf[:n], err: err, hashed: make(chan struct{})}
			toHash <- c // buffered as deep as the pool: never blocks
			select {
			case a.out <- c:
			case <-a.stop:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	go func() { // hasher: ends when the reader has ended and everything read is hashed
		defer a.wg.Done()
		for c := range toHash {
			if a.h != nil && !a.skip.Load() {
				a.h.Write(c.buf)
			}
			close(c.hashed)
		}
	}()
	return a
}

func (a *aheadReader) Read(p []byte) (int, error) {
	for a.cur == nil || a.off == len(a.cur.buf) {
		if a.cur != nil {
			if a.cur.err != nil {
				return 0, a.cur.err
			}
			<-a.cur.hashed
			a.free <- a.cur.buf[:cap(a.cur.buf)]
			a.cur = nil
		}
		if a.err != nil {
			return 0, a.err
		}
		c, ok := <-a.out
		if !ok {
			a.err = io.ErrClosedPipe // stopped
			if err := a.ctx.Err(); err != nil {
				a.err = err
			}
			return 0, a.err
		}
		a.cur, a.off = c, 0
	}
	n := copy(p, a.cur.buf[a.off:])
	a.off += n
	return n, nil
}

// Close stops the goroutines and waits for them; then the hash covers every byte Read returned
// (all of the source once Read has returned io.EOF).
func (a *aheadReader) Close() {
	select {
	case <-a.stop:
	default:
		close(a.stop)
	}
	a.wg.Wait()
}

// noHash stops hashing what is read from now on; sum must not be called.
func (a *aheadReader) noHash() { a.skip.Store(true) }

// sum closes a and returns its digest as "sha256:HEX".
func (a *aheadReader) sum() string {
	a.Close()
	return "sha256:" + hex.EncodeToString(a.h.Sum(nil))
}
