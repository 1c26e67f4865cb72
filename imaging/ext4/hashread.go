package ext4

import (
	"context"
	"io"
	"sync"
)

// hashReader reads its source on its own goroutine and hands each chunk to the content hash
// (whose leaves are hashed on further goroutines) without copying it, so neither the read
// syscalls nor SHA-256 sit on the writer's path. At most hashBuffers chunks are in flight,
// which bounds its memory. With a disabled hash it is a read-ahead buffer.
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
	hashed <-chan struct{}
}

const hashBuffers = 8

func newHashReader(ctx context.Context, r io.Reader, h *treeHash) *hashReader {
	hr := &hashReader{
		out:  make(chan *hchunk, hashBuffers),
		free: make(chan []byte, hashBuffers),
		stop: make(chan struct{}),
	}
	for i := 0; i < hashBuffers; i++ {
		hr.free <- make([]byte, leafSize)
	}
	hr.wg.Add(1)
	go func() { // ends at EOF, on a read error, on Close or when ctx ends
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
			c := &hchunk{buf: buf[:n], err: err}
			if n == leafSize && h.aligned() {
				c.hashed = h.submit(buf)
			} else {
				h.Write(buf[:n]) // the last, partial chunk: copied
				c.hashed = closedDone
			}
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

// Close stops the reading goroutine and waits for it. The hash covers every byte read, and is
// complete once Read has returned io.EOF.
func (hr *hashReader) Close() {
	close(hr.stop)
	hr.wg.Wait()
}
