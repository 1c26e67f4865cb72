// Package proto is the wire protocol between virtkit's host-side clients (agent/client) and the
// guest agent's exec server (agent/execserver). It is versioned and framed; PROTOCOL.md in agent/
// is the normative description. This package holds the frame codec and the message types only.
//
// Concurrency: a Reader must be used by one goroutine at a time; a Writer serialises its own
// writes, so any number of goroutines may call it at once.
package proto

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// Version is the protocol version this build speaks. Peers must speak the same version: a
// mismatch is reported by both sides and the connection is closed.
const Version = 1

// Magic identifies a virtkit agent peer in the hello exchange.
const Magic = "virtkit-agent"

// MaxPayload bounds a frame's payload. Larger lengths are a protocol error, never an allocation.
const MaxPayload = 1 << 20

// DataChunk is the largest payload the exec server and client put in one data frame.
const DataChunk = 128 << 10

// StdinWindow is the stdin credit a session starts with; the server returns credit with Window
// frames as it writes stdin to the process, so a client can never make the agent buffer more.
const StdinWindow = 1 << 20

// HeaderLen is the size of a frame header: a 4-byte big-endian payload length and a type byte.
const HeaderLen = 5

// Type is a frame type.
type Type uint8

// Frame types. Requests flow client→server, replies server→client; see PROTOCOL.md.
const (
	THello      Type = 1  // both ways, first frame: Hello (JSON)
	TError      Type = 2  // server→client: Error (JSON); the server closes the connection after it
	TPing       Type = 3  // client→server: empty
	TPong       Type = 4  // server→client: empty
	TInfo       Type = 5  // client→server: empty; reply TInfo with Info (JSON)
	TExec       Type = 6  // client→server: Exec (JSON); dedicates the connection to one session
	TStarted    Type = 7  // server→client: Started (JSON)
	TStdin      Type = 8  // client→server: raw bytes, within the stdin credit
	TStdinClose Type = 9  // client→server: empty; closes the process's stdin
	TSignal     Type = 10 // client→server: Signal (JSON)
	TResize     Type = 11 // client→server: Resize (JSON)
	TWindow     Type = 12 // server→client: Window (JSON), more stdin credit
	TStdout     Type = 13 // server→client: raw bytes
	TStderr     Type = 14 // server→client: raw bytes
	TExit       Type = 15 // server→client: Exit (JSON); last frame of a session
	TCopyIn     Type = 16 // client→server: Path (JSON), then TData… TEOF; reply TOK or TError
	TCopyOut    Type = 17 // client→server: Path (JSON); reply TData… TOK or TError
	TData       Type = 18 // both ways: raw tar bytes
	TEOF        Type = 19 // client→server: end of a TCopyIn stream
	TOK         Type = 20 // server→client: request done (empty)
	TForward    Type = 21 // client→server: Forward (JSON); after TOK the connection is a raw byte stream
	TShutdown   Type = 22 // client→server: Shutdown (JSON); reply TOK, then the guest shuts down
	TWait       Type = 23 // client→server: empty; reply TExit when the entrypoint has exited
	maxType          = TWait
)

var typeNames = [...]string{"", "hello", "error", "ping", "pong", "info", "exec", "started", "stdin",
	"stdin-close", "signal", "resize", "window", "stdout", "stderr", "exit", "copy-in", "copy-out",
	"data", "eof", "ok", "forward", "shutdown", "wait"}

func (t Type) String() string {
	if t >= 1 && t <= maxType {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Valid reports whether t is a frame type of this protocol version.
func (t Type) Valid() bool { return t >= 1 && t <= maxType }

// Frame is one decoded frame. Payload aliases the Reader's buffer and is valid until the next read.
type Frame struct {
	Type    Type
	Payload []byte
}

// ErrFrame marks a malformed frame: unknown type or oversized length. The connection cannot be
// resynchronised after it and must be closed.
var ErrFrame = errors.New("malformed frame")

// Reader decodes frames from a byte stream.
type Reader struct {
	r   *bufio.Reader
	buf []byte
}

// NewReader returns a Reader on r.
func NewReader(r io.Reader) *Reader { return &Reader{r: bufio.NewReaderSize(r, 64<<10)} }

// Buffered exposes bytes read ahead of the last frame (a forward stream's first bytes).
func (r *Reader) Buffered() *bufio.Reader { return r.r }

// Read reads the next frame. io.EOF means the peer closed cleanly between frames.
func (r *Reader) Read() (Frame, error) {
	var h [HeaderLen]byte
	if _, err := io.ReadFull(r.r, h[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return Frame{}, fmt.Errorf("read frame header: %w", err)
		}
		return Frame{}, err
	}
	n := binary.BigEndian.Uint32(h[:4])
	t := Type(h[4])
	if !t.Valid() {
		return Frame{}, fmt.Errorf("%w: unknown frame type %d", ErrFrame, h[4])
	}
	if n > MaxPayload {
		return Frame{}, fmt.Errorf("%w: %s frame of %d bytes exceeds %d", ErrFrame, t, n, MaxPayload)
	}
	if cap(r.buf) < int(n) {
		r.buf = make([]byte, n, max(int(n), 4096))
	}
	p := r.buf[:n]
	if _, err := io.ReadFull(r.r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, fmt.Errorf("read %s frame payload: %w", t, err)
	}
	return Frame{Type: t, Payload: p}, nil
}

// Writer encodes frames onto a stream. Each frame is written with one Write call under a mutex.
type Writer struct {
	mu  sync.Mutex
	w   io.Writer
	buf []byte
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Write sends one frame.
func (w *Writer) Write(t Type, payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("write %s frame: %d bytes exceeds %d", t, len(payload), MaxPayload)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(AppendHeader(w.buf[:0], t, len(payload)), payload...)
	_, err := w.w.Write(w.buf)
	if cap(w.buf) > 2*DataChunk {
		w.buf = nil
	}
	if err != nil {
		return fmt.Errorf("write %s frame: %w", t, err)
	}
	return nil
}

// WriteRaw sends a frame already laid out in b: HeaderLen bytes of space then the payload. It
// saves a copy on the hot stdout path.
func (w *Writer) WriteRaw(t Type, b []byte) error {
	PutHeader(b, t, len(b)-HeaderLen)
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := w.w.Write(b); err != nil {
		return fmt.Errorf("write %s frame: %w", t, err)
	}
	return nil
}

// WriteJSON sends a frame whose payload is v encoded as JSON.
func (w *Writer) WriteJSON(t Type, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s frame: %w", t, err)
	}
	return w.Write(t, b)
}

// AppendHeader appends a frame header to b.
func AppendHeader(b []byte, t Type, n int) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	return append(b, byte(t))
}

// PutHeader writes a frame header into b[:HeaderLen].
func PutHeader(b []byte, t Type, n int) {
	binary.BigEndian.PutUint32(b, uint32(n))
	b[4] = byte(t)
}

// Decode parses a JSON payload into v, naming the frame type in the error.
func Decode(f Frame, v any) error {
	if err := json.Unmarshal(f.Payload, v); err != nil {
		return fmt.Errorf("%w: decode %s frame: %v", ErrFrame, f.Type, err)
	}
	return nil
}

// Hello opens every connection, in both directions.
type Hello struct {
	Magic    string `json:"magic"`
	Version  int    `json:"version"`
	Software string `json:"software,omitempty"` // e.g. "virtkit-agent v0.3.1"
}

// Check reports a clear error when h is not a compatible peer's hello. side names the peer
// ("agent" or "client") for the message.
func (h Hello) Check(side string) error {
	if h.Magic != Magic {
		return fmt.Errorf("%w: peer is not a virtkit agent endpoint (magic %q)", ErrFrame, h.Magic)
	}
	if h.Version != Version {
		return &VersionError{Ours: Version, Theirs: h.Version, Side: side, Software: h.Software}
	}
	return nil
}

// VersionError is a protocol version mismatch.
type VersionError struct {
	Ours, Theirs int
	Side         string // who Theirs is: "agent" or "client"
	Software     string
}

func (e *VersionError) Error() string {
	s := fmt.Sprintf("protocol version mismatch: this side speaks v%d, the %s speaks v%d", e.Ours, e.Side, e.Theirs)
	if e.Software != "" {
		s += " (" + e.Software + ")"
	}
	return s + "; use a virtkit and virtkit-agent from the same release"
}

// Error codes carried in Error frames.
const (
	CodeVersion   = "version"     // protocol version mismatch
	CodeProtocol  = "protocol"    // malformed or unexpected frame
	CodeExec      = "exec"        // the command could not be started
	CodeDenied    = "denied"      // the allow-list refused the command
	CodeNotFound  = "not-found"   // a path or user does not exist
	CodeIO        = "io"          // a file or network operation failed
	CodeForward   = "forward"     // the guest port refused the connection
	CodeUnsupport = "unsupported" // the agent cannot do this here
)

// Error is the payload of TError frames.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// RemoteError is an Error frame received from the agent, usable with errors.As.
type RemoteError Error

func (e *RemoteError) Error() string { return "agent: " + e.Message }

// Exec starts a session.
type Exec struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"`  // KEY=VALUE, on top of the agent's base environment
	Dir  string   `json:"dir,omitempty"`  // working directory; default the user's home or /
	User string   `json:"user,omitempty"` // name, uid, name:group or uid:gid; default root
	TTY  bool     `json:"tty,omitempty"`
	Rows uint16   `json:"rows,omitempty"`
	Cols uint16   `json:"cols,omitempty"`
}

// Started confirms a session's process is running.
type Started struct {
	Pid int `json:"pid"`
}

// Signal asks for a signal to the session's process group.
type Signal struct {
	Signal int `json:"signal"`
}

// Resize sets the session's terminal size.
type Resize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// Window grants N more bytes of stdin credit.
type Window struct {
	N uint32 `json:"n"`
}

// Exit ends a session: Code is the exit code, or 128+Signal when a signal killed the process.
type Exit struct {
	Code   int `json:"code"`
	Signal int `json:"signal,omitempty"`
}

// Path names a file or folder for copy requests.
type Path struct {
	Path string `json:"path"`
}

// Forward asks the agent to connect to a TCP port in the guest.
type Forward struct {
	Port int    `json:"port"`
	Host string `json:"host,omitempty"` // default 127.0.0.1
}

// Shutdown asks the guest to stop: power off, or reboot when Poweroff is false.
type Shutdown struct {
	Poweroff bool `json:"poweroff"`
}

// Mark is a boot milestone, as time since the agent (PID 1) started.
type Mark struct {
	Name  string        `json:"name"`
	Since time.Duration `json:"since_ns"`
}

// Entrypoint is the state of the image's entrypoint in entrypoint mode.
type Entrypoint struct {
	Pid     int   `json:"pid,omitempty"`
	Running bool  `json:"running"`
	Exit    *Exit `json:"exit,omitempty"`
}

// Info describes the agent and its guest.
type Info struct {
	Version    string        `json:"version"`  // agent software version
	Protocol   int           `json:"protocol"` // protocol version
	Hostname   string        `json:"hostname"`
	Kernel     string        `json:"kernel,omitempty"`
	Mode       string        `json:"mode,omitempty"` // entrypoint, agent, systemd, or serve (not PID 1)
	PID1       bool          `json:"pid1"`
	Uptime     time.Duration `json:"uptime_ns"`
	KernelBoot time.Duration `json:"kernel_boot_ns,omitempty"` // kernel uptime when the agent started
	Boot       []Mark        `json:"boot,omitempty"`           // PID 1 start → serving milestones
	Entrypoint *Entrypoint   `json:"entrypoint,omitempty"`
}
