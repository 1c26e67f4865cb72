package ext4

import (
	"context"
	"hash"
	"io"
	"sync"
)

// hashReader reads its source on one goroutine and hashes every byte on another, so neither the
// read syscalls nor SHA-256 sit on the writer's path. At most hashBuffers chunks are in flight,
// which bounds its memory.
type hashReader struct {
	out    chan *hchunk
	toHash chan *hchunk
	free   chan []byte
	stop   chan struct{}
	wg     sync.WaitGroup
	cur    *hchunk
	off    int
	err    error
}

type hchunk struct {
	buf    []byte
	err    error
	hashed chan struct{}
}

const (
	hashBuffers = 4
	hashChunk   = 1 << 20
)

func newHashReader(ctx context.Context, r io.Reader, h hash.Hash) *hashReader {
	hr := &hashReader{
		out:    make(chan *hchunk, hashBuffers),
		toHash: make(chan *hchunk, hashBuffers),
		free:   make(chan []byte, hashBuffers),
		stop:   make(chan struct{}),
	}
	for i := 0; i < hashBuffers; i++ {
		hr.free <- make([]byte, hashChunk)
	}
	hr.wg.Add(2)
	go func() { // reader: ends at EOF, on a read error, on Close or when ctx ends
		defer hr.wg.Done()
		defer close(hr.out)
		defer close(hr.toHash)
		for {
			var buf []byte
			select {
			case buf = <-hr.free:
			case <-hr.stop:
				return
			case <-ctx.Done():
				return
			}
			n, err := io.ReadFull(r, buf)
			if err == io.ErrUnexpectedEOF {
				err = io.EOF
			}
			c := &hchunk{buf: buf[:n], err: err, hashed: make(chan struct{})}
			hr.toHash <- c // buffered as deep as the pool: never blocks
			select {
			case hr.out <- c:
			case <-hr.stop:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	go func() { // hasher: ends when the reader has ended and everything read is hashed
		defer hr.wg.Done()
		for c := range hr.toHash {
			h.Write(c.buf)
			close(c.hashed)
		}
	}()
	return hr
}

func (hr *hashReader) Read(p []byte) (int, error) {
	for hr.cur == nil || hr.off == len(hr.cur.buf) {
		if hr.cur != nil {
			if hr.cur.err != nil {
				return 0, hr.cur.err
			}
			hr.release()
		}
		if hr.err != nil {
			return 0, hr.err
		}
		c, ok := <-hr.out
		if !ok {
			hr.err = io.ErrClosedPipe // stopped or cancelled; the caller checks its context
			return 0, hr.err
		}
		hr.cur, hr.off = c, 0
	}
	n := copy(p, hr.cur.buf[hr.off:])
	hr.off += n
	return n, nil
}

func (hr *hashReader) release() {
	<-hr.cur.hashed
	hr.free <- hr.cur.buf[:cap(hr.cur.buf)]
	hr.cur = nil
}

// Close stops the goroutines and waits for them; the hash covers every byte read, complete once
// Read has returned io.EOF.
func (hr *hashReader) Close() {
	close(hr.stop)
	hr.wg.Wait()
}
