package lan

import (
	"context"
	"fmt"
	"net"
	"time"
)

// AddForward starts a host→guest TCP forward: connections accepted on f.Listen (a host address)
// are carried by the gateway to f.Port on the port named f.Name, looked up at connect time.
func (s *Switch) AddForward(f Forward) error {
	if f.Proto == "" {
		f.Proto = "tcp"
	}
	if f.Proto != "tcp" {
		return fmt.Errorf("lan: forward %s: only tcp is supported", f)
	}
	l, err := net.Listen("tcp", f.Listen)
	if err != nil {
		return fmt.Errorf("lan: forward %s: %w", f, err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrClosed
	}
	if _, ok := s.forwards[f.Listen]; ok {
		s.mu.Unlock()
		l.Close()
		return fmt.Errorf("lan: forward %s: %s already forwarded", f, f.Listen)
	}
	s.forwards[f.Listen] = l
	s.wg.Add(1)
	s.mu.Unlock()
	s.log.Info().Str("forward", f.String()).Msg("forward listening")
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go s.forwardConn(f, c.(*net.TCPConn))
		}
	}()
	return nil
}

// RemoveForward stops the forward listening on listen.
func (s *Switch) RemoveForward(listen string) {
	s.mu.Lock()
	l := s.forwards[listen]
	delete(s.forwards, listen)
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
}

func (s *Switch) forwardConn(f Forward, hc *net.TCPConn) {
	p, ok := s.Port(f.Name)
	if !ok {
		s.log.Debug().Str("forward", f.String()).Msg("forward: no such port")
		hc.SetLinger(0)
		hc.Close()
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, 10*time.Second)
	gc, err := s.dialGuest(ctx, p.ip, f.Port)
	cancel()
	if err != nil {
		s.log.Debug().Str("forward", f.String()).Err(err).Msg("forward dial")
		hc.SetLinger(0) // refused in the guest: refuse on the host
		hc.Close()
		return
	}
	s.splice(gc, hc)
}
