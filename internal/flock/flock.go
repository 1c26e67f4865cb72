// Package flock takes exclusive locks that other processes see: flock(2) on a lock file, held
// until the returned function closes it (or the process ends). The image store, the layer cache,
// the fleet controller and the test fixtures lock with it.
package flock

import (
	"context"
	"errors"
	"os"
	"syscall"
	"time"
)

// Lock takes the exclusive flock of the file at path, creating it, and returns the function that
// lets it go. It polls (1 ms, doubling to 100 ms) rather than blocking in the kernel, so ending
// ctx ends the wait: it then returns ctx.Err(). Any other failure is the open's or flock's error.
func Lock(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for delay := time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, err
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(delay):
		}
	}
}
