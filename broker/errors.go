package broker

import "errors"

// Sentinel errors callers decide on with errors.Is.
var (
	// ErrNoDaemon: no endpoint file in the state dir, or its daemon is gone.
	ErrNoDaemon = errors.New("broker: no local daemon running")
	// ErrUnknownEventType: an envelope names a type this build has no Go type for.
	ErrUnknownEventType = errors.New("broker: unknown event type")
	// ErrBadEnvelope: a message on an event subject is not a valid envelope.
	ErrBadEnvelope = errors.New("broker: bad event envelope")
	// ErrBadToken: an id or host name cannot be used as a NATS subject token.
	ErrBadToken = errors.New("broker: not a valid subject token")
	// ErrInsecureCredential: a credential file is readable by other users.
	ErrInsecureCredential = errors.New("broker: credential file is readable by group or others")
)

// permanent marks a work error that retrying cannot fix.
type permanent struct{ err error }

func (p *permanent) Error() string { return p.err.Error() }
func (p *permanent) Unwrap() error { return p.err }

// Permanent wraps err so the work-queue helpers terminate the message (no redelivery) instead of
// asking for a retry. Use it for bad requests, never for transient host trouble.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanent{err}
}

// IsPermanent reports whether err (or an error it wraps) was marked by Permanent.
func IsPermanent(err error) bool {
	var p *permanent
	return errors.As(err, &p)
}
