package proto

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	var b bytes.Buffer
	w := NewWriter(&b)
	w.WriteJSON(THello, Hello{Magic: Magic, Version: Version})
	w.WriteJSON(TExec, Exec{Argv: []string{"sh", "-c", "true"}, TTY: true, Rows: 3, Cols: 4})
	w.Write(TStdout, []byte("data"))
	w.Write(TPing, nil)
	r := NewReader(&b)
	f, _ := r.Read()
	var h Hello
	if f.Type != THello || Decode(f, &h) != nil || h.Check("agent") != nil {
		t.Fatalf("hello: %v %+v", f.Type, h)
	}
	f, _ = r.Read()
	var e Exec
	if f.Type != TExec || Decode(f, &e) != nil || e.Argv[2] != "true" || !e.TTY || e.Rows != 3 {
		t.Fatalf("exec: %+v", e)
	}
	if f, _ = r.Read(); f.Type != TStdout || string(f.Payload) != "data" {
		t.Fatalf("stdout: %v %q", f.Type, f.Payload)
	}
	if f, _ = r.Read(); f.Type != TPing || len(f.Payload) != 0 {
		t.Fatalf("ping: %v", f.Type)
	}
	if _, err := r.Read(); err != io.EOF {
		t.Fatalf("end: %v", err)
	}
}

func TestBadFrames(t *testing.T) {
	for name, in := range map[string][]byte{
		"unknown type": {0, 0, 0, 0, 99},
		"type zero":    {0, 0, 0, 0, 0},
		"too long":     {0x7f, 0, 0, 0, byte(TStdout)},
	} {
		_, err := NewReader(bytes.NewReader(in)).Read()
		if !errors.Is(err, ErrFrame) {
			t.Errorf("%s: %v, want ErrFrame", name, err)
		}
	}
	if _, err := NewReader(bytes.NewReader([]byte{0, 0, 0, 9, 13, 1})).Read(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("short payload: %v", err)
	}
	if err := (Hello{Magic: "ssh"}).Check("agent"); !errors.Is(err, ErrFrame) {
		t.Errorf("bad magic: %v", err)
	}
	var ve *VersionError
	if err := (Hello{Magic: Magic, Version: 7}).Check("agent"); !errors.As(err, &ve) || ve.Theirs != 7 {
		t.Errorf("version: %v", err)
	}
}

// FuzzReader feeds arbitrary bytes to the frame decoder and every message decoder: errors are
// fine, panics and unbounded allocations are not.
func FuzzReader(f *testing.F) {
	var b bytes.Buffer
	w := NewWriter(&b)
	w.WriteJSON(THello, Hello{Magic: Magic, Version: Version})
	w.WriteJSON(TExec, Exec{Argv: []string{"x"}, Env: []string{"A=B"}, TTY: true})
	w.WriteJSON(TSignal, Signal{Signal: 2})
	w.WriteJSON(TResize, Resize{Rows: 1, Cols: 2})
	w.WriteJSON(TWindow, Window{N: 5})
	w.WriteJSON(TExit, Exit{Code: 130, Signal: 2})
	w.WriteJSON(TInfo, Info{Version: "v", Boot: []Mark{{Name: "x", Since: 5}}})
	w.Write(TStdin, []byte("abc"))
	f.Add(b.Bytes())
	f.Add([]byte{0, 0, 0, 0, 1})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 8})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data))
		for {
			fr, err := r.Read()
			if err != nil {
				return
			}
			if !fr.Type.Valid() || len(fr.Payload) > MaxPayload {
				t.Fatalf("reader returned invalid frame %v len %d", fr.Type, len(fr.Payload))
			}
			var v any
			switch fr.Type {
			case THello:
				v = &Hello{}
			case TError:
				v = &Error{}
			case TExec:
				v = &Exec{}
			case TSignal:
				v = &Signal{}
			case TResize:
				v = &Resize{}
			case TWindow:
				v = &Window{}
			case TExit:
				v = &Exit{}
			case TInfo:
				v = &Info{}
			case TCopyIn, TCopyOut:
				v = &Path{}
			case TForward:
				v = &Forward{}
			case TShutdown:
				v = &Shutdown{}
			default:
				continue
			}
			if err := Decode(fr, v); err != nil && !errors.Is(err, ErrFrame) {
				t.Fatalf("decode error not ErrFrame: %v", err)
			}
			if h, ok := v.(*Hello); ok {
				_ = h.Check("agent")
			}
		}
	})
}
