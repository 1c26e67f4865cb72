// Package virtctl is fleet control from inside a fleet VM: the wire protocol between the guest's
// `virtctl` command and the host's fleet control server, and the guest-side client.
//
// The guest dials vsock CID 2 port 1099 (addr.PortControl); with hybrid vsock this lands on the
// host listener <VM folder>/vsock.sock_1099, which knows which VM is asking from the socket the
// connection came in on. One request per connection: a JSON line each way.
//
// The package uses the standard library and agent/addr only (the agent's import guard applies).
// Its functions are safe for concurrent use.
package virtctl

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/virtkit/virtkit/agent/addr"
)

// Endpoint is where the guest reaches the host's fleet control server.
var Endpoint = fmt.Sprintf("vsock://2:%d", addr.PortControl)

// Ops a request may carry.
const (
	OpStart   = "start"
	OpStop    = "stop"
	OpRestart = "restart"
	OpStatus  = "status"
	OpLs      = "ls"
)

// maxLine bounds one message: a status of a large fleet fits easily.
const maxLine = 1 << 20

// Request is one virtctl command.
type Request struct {
	Op string `json:"op"`
	// Unit is the target unit; empty for ls and for status of every unit.
	Unit string `json:"unit,omitempty"`
}

// Validate checks the op and that start, stop and restart name a unit.
func (r Request) Validate() error {
	switch r.Op {
	case OpStart, OpStop, OpRestart:
		if r.Unit == "" {
			return fmt.Errorf("virtctl %s: which unit?", r.Op)
		}
	case OpStatus, OpLs:
	default:
		return fmt.Errorf("virtctl: unknown command %q (want start, stop, restart, status or ls)", r.Op)
	}
	if strings.ContainsAny(r.Unit, " /\n\t") || len(r.Unit) > 63 {
		return fmt.Errorf("virtctl: bad unit name %q", r.Unit)
	}
	return nil
}

// UnitStatus is one unit as the host sees it.
type UnitStatus struct {
	Unit  string `json:"unit"`
	VM    string `json:"vm"`
	Phase string `json:"phase"` // running, stopped, starting, failed
	IP    string `json:"ip,omitempty"`
	// Health is healthy, unhealthy or "" when the unit has no check or is not running.
	Health string `json:"health,omitempty"`
	// Control says whether the asking VM may start and stop this unit.
	Control bool `json:"control"`
}

// Response answers a Request.
type Response struct {
	OK      bool         `json:"ok"`
	Error   string       `json:"error,omitempty"`
	Message string       `json:"message,omitempty"`
	Units   []UnitStatus `json:"units,omitempty"`
}

// Refused is the error a client gets when the host refused the request.
type Refused struct{ Msg string }

func (e *Refused) Error() string { return e.Msg }

// Write sends one message as a JSON line.
func Write(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("virtctl: encode: %w", err)
	}
	if _, err := w.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("virtctl: write: %w", err)
	}
	return nil
}

// Read reads one JSON-line message into v.
func Read(r *bufio.Reader, v any) error {
	var line []byte
	for {
		chunk, isPrefix, err := r.ReadLine()
		if err != nil {
			if errors.Is(err, io.EOF) && len(line) > 0 {
				break
			}
			return fmt.Errorf("virtctl: read: %w", err)
		}
		line = append(line, chunk...)
		if len(line) > maxLine {
			return errors.New("virtctl: read: message too long")
		}
		if !isPrefix {
			break
		}
	}
	if err := json.Unmarshal(line, v); err != nil {
		return fmt.Errorf("virtctl: decode: %w", err)
	}
	return nil
}

// Do sends req to the host's control server at endpoint (Endpoint in a guest) and returns its
// answer. A refusal or failed operation is a *Refused error carrying the host's message.
func Do(ctx context.Context, endpoint string, req Request) (*Response, error) {
	if err := req.Validate(); err != nil {
		return nil, err
	}
	c, err := addr.Dial(ctx, endpoint)
	if err != nil {
		return nil, fmt.Errorf("virtctl: reach the host's fleet control at %s: %w (is this VM part of a fleet run by virtkit serve?)", endpoint, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	if err := Write(c, req); err != nil {
		return nil, err
	}
	var resp Response
	if err := Read(bufio.NewReader(c), &resp); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("virtctl: %w", ctx.Err())
		}
		return nil, err
	}
	if !resp.OK {
		return &resp, &Refused{Msg: resp.Error}
	}
	return &resp, nil
}

// Serve answers connections on l with handle until l is closed or ctx ends; each connection
// carries one request. handle's error becomes a refusal. Serve returns when every connection
// it accepted has been answered.
func Serve(ctx context.Context, l net.Listener, handle func(ctx context.Context, req Request) (*Response, error)) {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	done := make(chan struct{})
	n := 0
	for {
		c, err := l.Accept()
		if err != nil {
			break
		}
		n++
		go func() {
			defer func() { done <- struct{}{} }()
			defer c.Close()
			var req Request
			if err := Read(bufio.NewReader(io.LimitReader(c, maxLine+1)), &req); err != nil {
				Write(c, Response{Error: err.Error()})
				return
			}
			if err := req.Validate(); err != nil {
				Write(c, Response{Error: err.Error()})
				return
			}
			resp, err := handle(ctx, req)
			if err != nil {
				Write(c, Response{Error: err.Error()})
				return
			}
			resp.OK = true
			Write(c, resp)
		}()
	}
	for ; n > 0; n-- {
		<-done
	}
}
