package fleet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/agent/virtctl"
	"github.com/virtkit/virtkit/broker"
)

// ControlServer is the host side of virtctl, run by the daemon as the "fleet" worker: for every
// fleet VM that becomes ready on this host it listens on the VM's guest→host control socket
// (<VM folder>/vsock.sock_1099), so the listener itself identifies the asking VM, and turns
// requests into Controller operations (broker work). A VM whose unit has no virtctl permission
// for the target is refused. At start it resumes the applied fleets (autostart units).
//
// Run owns every goroutine it starts; they end when Run returns.
type ControlServer struct {
	c   *Controller
	bc  *broker.Client
	log zerolog.Logger

	mu        sync.Mutex
	listeners map[string]net.Listener
}

// NewControlServer returns the fleet control worker.
func NewControlServer(c *Controller, bc *broker.Client, log zerolog.Logger) *ControlServer {
	return &ControlServer{c: c, bc: bc, log: log, listeners: map[string]net.Listener{}}
}

// Name implements workers.Worker.
func (s *ControlServer) Name() string { return "fleet" }

// Run implements workers.Worker.
func (s *ControlServer) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := make(chan broker.Event, 64)
	sub, err := s.bc.Subscribe(ctx, broker.SubscribeOptions{Filters: []string{broker.EventFilter("vm", "", "")}, New: true},
		func(ctx context.Context, _ *broker.Envelope, ev broker.Event) error {
			select {
			case events <- ev:
			case <-ctx.Done():
			}
			return nil
		})
	if err != nil {
		return fmt.Errorf("fleet: follow vm events: %w", err)
	}
	defer sub.Stop()
	// VMs already running (a worker restarted under a live launcher).
	for _, name := range s.c.List() {
		if a, err := s.c.Load(name); err == nil {
			for _, u := range a.Units {
				if s.c.Running(u.Request.Name) {
					s.listen(ctx, &wg, u.Request.Name)
				}
			}
		}
	}
	// Resume applied fleets after a daemon or host restart.
	wg.Add(1)
	go func() {
		defer wg.Done()
		// The launcher worker reaps leftovers first; give it a moment to take work.
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
			return
		}
		for _, name := range s.c.List() {
			err := s.c.Resume(ctx, name, func(unit, msg string) {
				s.log.Info().Str("fleet", name).Str("unit", unit).Msg(msg)
			})
			if err != nil && ctx.Err() == nil {
				s.log.Error().Err(err).Str("fleet", name).Msg("resume fleet")
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			s.closeAll()
			return nil
		case ev := <-events:
			switch e := ev.(type) {
			case *broker.VMReady:
				s.listen(ctx, &wg, e.VM)
			case *broker.VMStopped:
				s.unlisten(e.VM)
			case *broker.VMFailed:
				s.unlisten(e.VM)
			}
		}
	}
}

func (s *ControlServer) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for vm, l := range s.listeners {
		l.Close()
		delete(s.listeners, vm)
	}
}

func (s *ControlServer) unlisten(vm string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l := s.listeners[vm]; l != nil {
		l.Close()
		delete(s.listeners, vm)
	}
}

// listen serves virtctl for vm if it belongs to a fleet.
func (s *ControlServer) listen(ctx context.Context, wg *sync.WaitGroup, vm string) {
	a, unit, ok := s.c.Owner(vm)
	if !ok || !s.c.Running(vm) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.listeners[vm] != nil {
		return
	}
	path := s.c.ControlSocket(vm)
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		s.log.Error().Err(err).Str("vm", vm).Msg("fleet control listener")
		return
	}
	s.listeners[vm] = l
	log := s.log.With().Str("fleet", a.Name).Str("unit", unit).Logger()
	wg.Add(1)
	go func() {
		defer wg.Done()
		virtctl.Serve(ctx, l, func(ctx context.Context, req virtctl.Request) (*virtctl.Response, error) {
			resp, err := s.Handle(ctx, a.Name, unit, req)
			ev := log.Info()
			if err != nil {
				ev = log.Warn().Err(err)
			}
			ev.Str("op", req.Op).Str("target", req.Unit).Msg("virtctl")
			return resp, err
		})
	}()
}

// Handle answers a virtctl request from unit `from` of fleet `fleet`.
func (s *ControlServer) Handle(ctx context.Context, fleet, from string, req virtctl.Request) (*virtctl.Response, error) {
	a, err := s.c.Load(fleet)
	if err != nil {
		return nil, err
	}
	self := a.Units[from]
	if self == nil {
		return nil, fmt.Errorf("unit %s is no longer part of fleet %s", from, fleet)
	}
	if !self.Virtctl.Enabled() {
		return nil, fmt.Errorf("refused: unit %s of fleet %s may not use virtctl (give it `virtctl: true` or a list of units in the fleet file)", from, fleet)
	}
	if req.Unit != "" && a.Units[req.Unit] == nil {
		return nil, fmt.Errorf("fleet %s has no unit %q", fleet, req.Unit)
	}
	switch req.Op {
	case virtctl.OpStatus, virtctl.OpLs:
		st, err := s.c.Status(ctx, fleet)
		if err != nil {
			return nil, err
		}
		resp := &virtctl.Response{}
		for _, u := range st {
			if req.Unit != "" && u.Unit != req.Unit {
				continue
			}
			resp.Units = append(resp.Units, virtctl.UnitStatus{Unit: u.Unit, VM: u.VM, Phase: u.Phase, IP: u.IP, Health: u.Health, Control: self.Virtctl.Allows(u.Unit)})
		}
		return resp, nil
	}
	if !self.Virtctl.Allows(req.Unit) {
		return nil, fmt.Errorf("refused: unit %s of fleet %s may not %s unit %s (not in its virtctl list)", from, fleet, req.Op, req.Unit)
	}
	if req.Unit == from && req.Op != virtctl.OpStatus {
		return nil, errors.New("refused: a unit cannot start, stop or restart itself with virtctl; use `virtkit fleet` on the host")
	}
	t0 := time.Now()
	switch req.Op {
	case virtctl.OpStop:
		err = s.c.StopUnit(ctx, fleet, req.Unit)
	case virtctl.OpStart:
		err = s.c.StartUnit(ctx, fleet, req.Unit, nil)
	case virtctl.OpRestart:
		if err = s.c.StopUnit(ctx, fleet, req.Unit); err == nil {
			err = s.c.StartUnit(ctx, fleet, req.Unit, nil)
		}
	}
	if err != nil {
		return nil, err
	}
	past := map[string]string{virtctl.OpStart: "started", virtctl.OpStop: "stopped", virtctl.OpRestart: "restarted"}[req.Op]
	return &virtctl.Response{Message: fmt.Sprintf("%s %s in %s", req.Unit, past, time.Since(t0).Round(time.Millisecond))}, nil
}
