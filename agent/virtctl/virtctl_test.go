package virtctl

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestDoServe runs the client against Serve over a real unix socket: answers, refusals,
// bad requests, and Serve's end when its listener closes.
func TestDoServe(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var seen []Request
	var mu sync.Mutex
	done := make(chan struct{})
	go func() {
		defer close(done)
		Serve(ctx, l, func(ctx context.Context, req Request) (*Response, error) {
			mu.Lock()
			seen = append(seen, req)
			mu.Unlock()
			if req.Unit == "db" {
				return nil, errors.New("refused: no db for you")
			}
			return &Response{Message: req.Op + " " + req.Unit, Units: []UnitStatus{{Unit: "redis", Phase: "running", Control: true}}}, nil
		})
	}()
	ep := "unix://" + sock
	resp, err := Do(ctx, ep, Request{Op: OpStop, Unit: "redis"})
	if err != nil || !resp.OK || resp.Message != "stop redis" || len(resp.Units) != 1 || !resp.Units[0].Control {
		t.Fatalf("stop redis: %+v, %v", resp, err)
	}
	_, err = Do(ctx, ep, Request{Op: OpStart, Unit: "db"})
	var r *Refused
	if !errors.As(err, &r) || r.Msg != "refused: no db for you" {
		t.Fatalf("refusal: %v", err)
	}
	if _, err := Do(ctx, ep, Request{Op: "reboot"}); err == nil || !strings.Contains(err.Error(), "unknown command") {
		t.Fatalf("bad op was sent: %v", err)
	}
	// A raw client sending garbage gets an error answer, not a hang.
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("{not json\n"))
	var bad Response
	if err := Read(bufio.NewReader(c), &bad); err != nil || bad.OK || !strings.Contains(bad.Error, "decode") {
		t.Fatalf("garbage: %+v, %v", bad, err)
	}
	c.Close()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not end with its context")
	}
	if len(seen) != 2 {
		t.Errorf("handler saw %v; want the two valid requests", seen)
	}
	if _, err := Do(context.Background(), ep, Request{Op: OpLs}); err == nil {
		t.Error("Do reached a closed server")
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		req Request
		ok  bool
	}{
		{Request{Op: OpLs}, true},
		{Request{Op: OpStatus}, true},
		{Request{Op: OpStatus, Unit: "redis"}, true},
		{Request{Op: OpStart}, false},
		{Request{Op: OpStop, Unit: "a b"}, false},
		{Request{Op: OpRestart, Unit: strings.Repeat("x", 64)}, false},
		{Request{Op: ""}, false},
	} {
		if err := tc.req.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: %v", tc.req, err)
		}
	}
}

// FuzzRead: any bytes decode to a request or an error, never a panic, and a valid request
// survives a write/read round trip.
func FuzzRead(f *testing.F) {
	for _, s := range []string{`{"op":"stop","unit":"redis"}` + "\n", `{"op":"ls"}`, "{", "", "\n\n", `{"op":1}`, strings.Repeat("[", 1000)} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var req Request
		if err := Read(bufio.NewReader(bytes.NewReader(b)), &req); err != nil {
			return
		}
		if req.Validate() != nil {
			return
		}
		var buf bytes.Buffer
		if err := Write(&buf, req); err != nil {
			t.Fatal(err)
		}
		var again Request
		if err := Read(bufio.NewReader(&buf), &again); err != nil || again != req {
			t.Fatalf("round trip: %+v -> %+v, %v", req, again, err)
		}
	})
}
