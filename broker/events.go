package broker

import (
	"fmt"
	"reflect"
	"time"
)

// The event types. Each is registered with its schema version in init; adding a field that old
// readers may ignore keeps the version, changing a field's meaning bumps it.

// VMStarting: a host accepted a launch and is booting the VM.
type VMStarting struct {
	VM        string `json:"vm"`
	Host      string `json:"host"`
	Image     string `json:"image,omitempty"`
	VMM       string `json:"vmm,omitempty"`
	CPUs      int    `json:"cpus,omitempty"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	// Job is the CI job the VM serves, if any.
	Job string `json:"job,omitempty"`
}

// VMReady: the guest agent answered; the VM takes commands.
type VMReady struct {
	VM         string `json:"vm"`
	IP         string `json:"ip,omitempty"`
	BootMillis int64  `json:"boot_ms,omitempty"`
}

// VMStopped: the VM powered off or was stopped.
type VMStopped struct {
	VM       string `json:"vm"`
	ExitCode int    `json:"exit_code"`
	Reason   string `json:"reason,omitempty"`
}

// VMFailed: the VM could not boot or its VMM died.
type VMFailed struct {
	VM    string `json:"vm"`
	Error string `json:"error"`
}

// VMRefused: a launch was refused because a VM of that name is running or booting; the VM it
// names is not affected (projections ignore this event).
type VMRefused struct {
	VM    string `json:"vm"`
	Error string `json:"error"`
}

// ImageConverting: a converter started turning Ref into a bootable bundle.
type ImageConverting struct {
	Image string `json:"image"`
	Ref   string `json:"ref"`
	Host  string `json:"host"`
}

// ImageConverted: the bundle for Ref is ready.
type ImageConverted struct {
	Image     string `json:"image"`
	Ref       string `json:"ref"`
	Digest    string `json:"digest,omitempty"`
	Path      string `json:"path,omitempty"`
	SizeBytes int64  `json:"size_bytes,omitempty"`
	// FSUUID is the ext4 UUID derived from the build inputs (staleness check).
	FSUUID string `json:"fs_uuid,omitempty"`
}

// ImageFailed: converting Ref failed.
type ImageFailed struct {
	Image string `json:"image"`
	Ref   string `json:"ref,omitempty"`
	Error string `json:"error"`
}

// JobQueued: a job was submitted to the pool.
type JobQueued struct {
	Job     string   `json:"job"`
	Image   string   `json:"image,omitempty"`
	Command []string `json:"command,omitempty"`
	// Origin names who asked (a GitLab job URL, a user).
	Origin string `json:"origin,omitempty"`
}

// JobStarted: a host took the job and runs it in VM.
type JobStarted struct {
	Job  string `json:"job"`
	Host string `json:"host"`
	VM   string `json:"vm,omitempty"`
}

// JobSucceeded: the job's command exited 0.
type JobSucceeded struct {
	Job string `json:"job"`
}

// JobFailed: the job failed. System is true when the failure is the host's or virtkit's, not the
// job's own (CI retries those).
type JobFailed struct {
	Job      string `json:"job"`
	ExitCode int    `json:"exit_code"`
	Error    string `json:"error,omitempty"`
	System   bool   `json:"system,omitempty"`
}

// JobCanceled: the job was canceled before it finished.
type JobCanceled struct {
	Job    string `json:"job"`
	Reason string `json:"reason,omitempty"`
}

// HostHeartbeat: a host is alive. Sent every few seconds with a message TTL, so the log keeps
// only recent ones and the vk_hosts projection forgets silent hosts.
type HostHeartbeat struct {
	Host     string         `json:"host"`
	Version  string         `json:"version,omitempty"`
	Started  time.Time      `json:"started"`
	Capacity int            `json:"capacity"`
	Running  int            `json:"running"`
	Workers  []WorkerStatus `json:"workers,omitempty"`
	// TTL is how long the host counts as alive without a newer heartbeat.
	TTL Duration `json:"ttl"`
}

// HostStopped: a host shut down cleanly.
type HostStopped struct {
	Host   string `json:"host"`
	Reason string `json:"reason,omitempty"`
}

// WorkerStatus is one supervised worker as a host reports it.
type WorkerStatus struct {
	Name     string    `json:"name"`
	State    string    `json:"state"` // starting, running, restarting, stopped, failed
	Restarts int       `json:"restarts,omitempty"`
	Since    time.Time `json:"since"`
	Error    string    `json:"error,omitempty"`
}

// Duration is a time.Duration that reads and writes as a Go duration string ("15s") in JSON.
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

func (e *VMStarting) EventType() string      { return "vm.starting" }
func (e *VMStarting) EventSubject() string   { return e.VM }
func (e *VMReady) EventType() string         { return "vm.ready" }
func (e *VMReady) EventSubject() string      { return e.VM }
func (e *VMStopped) EventType() string       { return "vm.stopped" }
func (e *VMStopped) EventSubject() string    { return e.VM }
func (e *VMFailed) EventType() string        { return "vm.failed" }
func (e *VMFailed) EventSubject() string     { return e.VM }
func (e *VMRefused) EventType() string       { return "vm.refused" }
func (e *VMRefused) EventSubject() string    { return e.VM }
func (e *ImageConverting) EventType() string { return "image.converting" }
func (e *ImageConverting) EventSubject() string {
	return e.Image
}
func (e *ImageConverted) EventType() string    { return "image.converted" }
func (e *ImageConverted) EventSubject() string { return e.Image }
func (e *ImageFailed) EventType() string       { return "image.failed" }
func (e *ImageFailed) EventSubject() string    { return e.Image }
func (e *JobQueued) EventType() string         { return "job.queued" }
func (e *JobQueued) EventSubject() string      { return e.Job }
func (e *JobStarted) EventType() string        { return "job.started" }
func (e *JobStarted) EventSubject() string     { return e.Job }
func (e *JobSucceeded) EventType() string      { return "job.succeeded" }
func (e *JobSucceeded) EventSubject() string   { return e.Job }
func (e *JobFailed) EventType() string         { return "job.failed" }
func (e *JobFailed) EventSubject() string      { return e.Job }
func (e *JobCanceled) EventType() string       { return "job.canceled" }
func (e *JobCanceled) EventSubject() string    { return e.Job }
func (e *HostHeartbeat) EventType() string     { return "host.heartbeat" }
func (e *HostHeartbeat) EventSubject() string  { return e.Host }
func (e *HostStopped) EventType() string       { return "host.stopped" }
func (e *HostStopped) EventSubject() string    { return e.Host }

func init() {
	for _, ev := range []Event{
		&VMStarting{}, &VMReady{}, &VMStopped{}, &VMFailed{}, &VMRefused{},
		&ImageConverting{}, &ImageConverted{}, &ImageFailed{},
		&JobQueued{}, &JobStarted{}, &JobSucceeded{}, &JobFailed{}, &JobCanceled{},
		&HostHeartbeat{}, &HostStopped{},
	} {
		RegisterEvent(ev, 1)
	}
}

// reflectNew returns a constructor of fresh values of proto's type (a pointer to a struct).
func reflectNew(proto Event) func() Event {
	t := reflect.TypeOf(proto)
	if t.Kind() != reflect.Pointer || t.Elem().Kind() != reflect.Struct {
		panic(fmt.Sprintf("broker: event prototype %T is not a pointer to a struct", proto))
	}
	return func() Event { return reflect.New(t.Elem()).Interface().(Event) }
}
