package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// ForwardFrom accepts connections on l and forwards each to TCP guestPort in the guest, until ctx
// ends or l fails. It closes l and waits for every forwarded connection to end before returning.
// onErr, if not nil, is told about connections that could not be forwarded.
func (c *Client) ForwardFrom(ctx context.Context, l net.Listener, guestPort int, onErr func(error)) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	var mu sync.Mutex
	open := map[net.Conn]struct{}{}
	defer func() {
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
	}()
	for {
		lc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("forward: accept on %s: %w", l.Addr(), err)
		}
		mu.Lock()
		open[lc] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				mu.Lock()
				delete(open, lc)
				mu.Unlock()
				lc.Close()
			}()
			gc, err := c.Forward(ctx, guestPort)
			if err != nil {
				if onErr != nil {
					onErr(fmt.Errorf("forward %s → guest port %d: %w", lc.RemoteAddr(), guestPort, err))
				}
				return
			}
			defer gc.Close()
			Splice(lc, gc)
		}()
	}
}

// Splice copies a→b and b→a until both directions end, passing half-closes on where the
// connections support CloseWrite (so request/response protocols that shut down writing work).
func Splice(a, b io.ReadWriteCloser) {
	var wg sync.WaitGroup
	wg.Add(2)
	half := func(dst io.ReadWriteCloser, src io.Reader) {
		defer wg.Done()
		_, err := io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok && (err == nil || errors.Is(err, io.EOF)) {
			if cw.CloseWrite() == nil {
				return
			}
		}
		// No half-close possible (or an error): end both directions.
		dst.Close()
		if c, ok := src.(io.Closer); ok {
			c.Close()
		}
	}
	go half(a, b)
	go half(b, a)
	wg.Wait()
}
