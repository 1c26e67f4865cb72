package broker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nuid"
)

// SpecVersion is the CloudEvents specification version the envelope attributes follow.
const SpecVersion = "1.0"

// Event is the body of one event type. Each event type is one Go type (see events.go) whose
// EventType is "<aggregate>.<name>" (vm.ready) and whose EventSubject is the id of the aggregate
// it is about (the VM's name); together they give the NATS subject vk.evt.<aggregate>.<id>.<name>.
type Event interface {
	EventType() string
	EventSubject() string
}

// Envelope is the versioned JSON form of every event on VIRTKIT_EVENTS, with CloudEvents-style
// attributes and the typed body in Data.
type Envelope struct {
	SpecVersion string `json:"specversion"`
	// ID is unique per event and doubles as the Nats-Msg-Id: publishing the same envelope twice
	// stores it once (within the stream's dedupe window).
	ID string `json:"id"`
	// Type is the event type, e.g. "vm.ready".
	Type string `json:"type"`
	// Source is the host that emitted the event.
	Source string `json:"source"`
	// Subject is the id of the aggregate (VM, image, job or host) the event is about.
	Subject string `json:"subject"`
	// Time is when the event happened, as told by its source. Projections use it, never the clock
	// of the reader, so a replay gives the same state.
	Time time.Time `json:"time"`
	// DataVersion is the schema version of Data for this Type.
	DataVersion     int             `json:"dataversion"`
	DataContentType string          `json:"datacontenttype,omitempty"`
	Data            json.RawMessage `json:"data"`

	// Seq is the VIRTKIT_EVENTS sequence number; set when the envelope was read from the stream.
	Seq uint64 `json:"-"`
}

// eventKind describes a registered event type.
type eventKind struct {
	version int
	new     func() Event
}

var (
	registryMu sync.RWMutex
	registry   = map[string]eventKind{}
)

// RegisterEvent makes an event type known to Decode. proto is a zero value of the Go type
// (a pointer to a struct); version is the current schema version of its body. Registering a type
// twice panics: event types are declared once.
func RegisterEvent(proto Event, version int) {
	typ := proto.EventType()
	agg, name, ok := strings.Cut(typ, ".")
	if !ok || validToken(agg) != nil || validToken(name) != nil {
		panic(fmt.Sprintf("broker: event type %q is not <aggregate>.<name>", typ))
	}
	registryMu.Lock()
	defer registryMu.Unlock()
	if _, dup := registry[typ]; dup {
		panic(fmt.Sprintf("broker: event type %q registered twice", typ))
	}
	rt := reflectNew(proto)
	registry[typ] = eventKind{version: version, new: rt}
}

// EventTypes lists the registered event types.
func EventTypes() []string {
	registryMu.RLock()
	defer registryMu.RUnlock()
	out := make([]string, 0, len(registry))
	for k := range registry {
		out = append(out, k)
	}
	return out
}

// NewEnvelope wraps ev with a fresh id, the source host and the current time. Keep the envelope
// to retry a publish: the same envelope is stored once.
func NewEnvelope(source string, ev Event) (*Envelope, error) {
	typ := ev.EventType()
	registryMu.RLock()
	k, ok := registry[typ]
	registryMu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("broker: new envelope for %T: %w %q", ev, ErrUnknownEventType, typ)
	}
	if err := validToken(ev.EventSubject()); err != nil {
		return nil, fmt.Errorf("broker: new envelope %s: subject: %w", typ, err)
	}
	if source == "" {
		return nil, fmt.Errorf("broker: new envelope %s: empty source host", typ)
	}
	data, err := json.Marshal(ev)
	if err != nil {
		return nil, fmt.Errorf("broker: new envelope %s: %w", typ, err)
	}
	return &Envelope{
		SpecVersion:     SpecVersion,
		ID:              nuid.Next(),
		Type:            typ,
		Source:          source,
		Subject:         ev.EventSubject(),
		Time:            time.Now().UTC(),
		DataVersion:     k.version,
		DataContentType: "application/json",
		Data:            data,
	}, nil
}

// NATSSubject is where the envelope is published: vk.evt.<aggregate>.<subject>.<name>.
func (e *Envelope) NATSSubject() string {
	agg, name, _ := strings.Cut(e.Type, ".")
	return EventSubjectPrefix + agg + "." + e.Subject + "." + name
}

// Aggregate is the aggregate kind of the event: vm, image, job or host.
func (e *Envelope) Aggregate() string {
	agg, _, _ := strings.Cut(e.Type, ".")
	return agg
}

// Marshal encodes the envelope as JSON.
func (e *Envelope) Marshal() ([]byte, error) { return json.Marshal(e) }

// Event decodes Data into the registered Go type for Type.
func (e *Envelope) Event() (Event, error) {
	registryMu.RLock()
	k, ok := registry[e.Type]
	registryMu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("broker: event %s: %w %q", e.ID, ErrUnknownEventType, e.Type)
	}
	if e.DataVersion > k.version || e.DataVersion < 1 {
		return nil, fmt.Errorf("broker: event %s: %w: %s data version %d, this build reads 1..%d", e.ID, ErrBadEnvelope, e.Type, e.DataVersion, k.version)
	}
	ev := k.new()
	dec := json.NewDecoder(bytes.NewReader(e.Data))
	if err := dec.Decode(ev); err != nil {
		return nil, fmt.Errorf("broker: event %s: %w: %s data: %v", e.ID, ErrBadEnvelope, e.Type, err)
	}
	if ev.EventSubject() != e.Subject {
		return nil, fmt.Errorf("broker: event %s: %w: data is about %q, envelope subject %q", e.ID, ErrBadEnvelope, ev.EventSubject(), e.Subject)
	}
	return ev, nil
}

// DecodeEnvelope parses and checks an envelope. subject, when not empty, is the NATS subject the
// message arrived on and must match the envelope. The body is not decoded: call Event.
func DecodeEnvelope(data []byte, subject string) (*Envelope, error) {
	var e Envelope
	if err := json.Unmarshal(data, &e); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadEnvelope, err)
	}
	switch {
	case e.SpecVersion != SpecVersion:
		return nil, fmt.Errorf("%w: specversion %q, want %q", ErrBadEnvelope, e.SpecVersion, SpecVersion)
	case e.ID == "" || !utf8.ValidString(e.ID) || len(e.ID) > 256:
		return nil, fmt.Errorf("%w: missing or bad id", ErrBadEnvelope)
	case e.Source == "":
		return nil, fmt.Errorf("%w: event %s: missing source", ErrBadEnvelope, e.ID)
	case e.Time.IsZero():
		return nil, fmt.Errorf("%w: event %s: missing time", ErrBadEnvelope, e.ID)
	case len(e.Data) == 0:
		return nil, fmt.Errorf("%w: event %s: missing data", ErrBadEnvelope, e.ID)
	}
	agg, name, ok := strings.Cut(e.Type, ".")
	if !ok || validToken(agg) != nil || validToken(name) != nil {
		return nil, fmt.Errorf("%w: event %s: type %q is not <aggregate>.<name>", ErrBadEnvelope, e.ID, e.Type)
	}
	if err := validToken(e.Subject); err != nil {
		return nil, fmt.Errorf("%w: event %s: subject: %v", ErrBadEnvelope, e.ID, err)
	}
	if subject != "" && subject != e.NATSSubject() {
		return nil, fmt.Errorf("%w: event %s arrived on %q but belongs on %q", ErrBadEnvelope, e.ID, subject, e.NATSSubject())
	}
	return &e, nil
}

// validToken checks that s can be one NATS subject token (and so a KV key part): not empty, at most
// 128 bytes of printable ASCII without '.', '*', '>' or spaces.
func validToken(s string) error {
	if s == "" {
		return fmt.Errorf("%w: empty", ErrBadToken)
	}
	if len(s) > 128 {
		return fmt.Errorf("%w: %.20q… is longer than 128 bytes", ErrBadToken, s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || c == '.' || c == '*' || c == '>' {
			return fmt.Errorf("%w: %q has %q at %d", ErrBadToken, s, c, i)
		}
	}
	return nil
}

// ValidID reports whether s can name a VM, image, job or host in subjects and KV keys.
func ValidID(s string) error { return validToken(s) }

// HostID turns a host name (which may be a dotted FQDN) into a valid subject token: every byte
// that may not appear in a token becomes '-'; an empty name becomes "localhost".
func HostID(name string) string {
	if name == "" {
		return "localhost"
	}
	b := []byte(name)
	if len(b) > 128 {
		b = b[:128]
	}
	for i, c := range b {
		if c <= ' ' || c >= 0x7f || c == '.' || c == '*' || c == '>' {
			b[i] = '-'
		}
	}
	return string(b)
}
