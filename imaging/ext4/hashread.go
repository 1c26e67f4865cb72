package ext4

import (
	"context"
	"hash"
	"io"
	"sync"
)

// hashReader reads its source in a goroutine that also hashes every byte, so the identity hash
// costs a second core instead of time on the writer's path. At most hashBuffers chunks are in
// flight, which bounds its memory.
type hashReader struct {
	out  chan *hchunk
	free chan []byte
	stop chan struct{}
	wg   sync.WaitGroup
	cur  *hchunk
	off  int
	err  error
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
	hr := &hashReader{out: make(chan *hchunk, hashBuffers), free: make(chan []byte, hashBuffers), stop: make(chan struct{})}
	for i := 0; i < hashBuffers; i++ {
		hr.free <- make([]byte, hashChunk)
	}
	hr.wg.Add(1)
	go func() {
		defer hr.wg.Done()
		defer close(hr.out)
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
			select {
			case hr.out <- c:
			case <-hr.stop:
				return
			}
			h.Write(c.buf)
			close(c.hashed)
			if err != nil {
				return
			}
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

// Close stops the goroutine and waits for it; the hash is complete once Read returned io.EOF.
func (hr *hashReader) Close() {
	close(hr.stop)
	hr.wg.Wait()
	if hr.cur != nil {
		<-hr.cur.hashed
	}
}
