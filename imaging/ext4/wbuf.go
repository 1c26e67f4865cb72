package ext4

import "os"

// combiner merges writes that continue each other into one pwrite: small files, directories and
// extent blocks are allocated back to back, so most of their writes are contiguous. It copies
// what it buffers, so callers may reuse their buffers at once.
type combiner struct {
	f   *os.File
	off int64
	buf []byte
}

func newCombiner(f *os.File) *combiner { return &combiner{f: f, buf: make([]byte, 0, 2<<20)} }

func (c *combiner) WriteAt(p []byte, off int64) (int, error) {
	if len(c.buf) > 0 && off == c.off+int64(len(c.buf)) && len(c.buf)+len(p) <= cap(c.buf) {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	if err := c.Flush(); err != nil {
		return 0, err
	}
	if len(p) >= 64<<10 { // file data: already large, copying it again costs more than a syscall
		return c.f.WriteAt(p, off)
	}
	c.off = off
	c.buf = append(c.buf, p...)
	return len(p), nil
}

// Flush writes what is buffered.
func (c *combiner) Flush() error {
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.f.WriteAt(c.buf, c.off)
	c.buf = c.buf[:0]
	return err
}
