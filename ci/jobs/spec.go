package jobs

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/virtkit/virtkit/broker"
)

// Spec is one job as it travels on broker.WorkCIJob.
type Spec struct {
	// ID names the job everywhere: work id, job.* events, the job VM and its LAN. It must match
	// IDPattern.
	ID string `json:"id"`
	// Image is the job VM's image reference (docker://REF, a bare REF, oci:, docker-archive:, tar:).
	Image     string `json:"image"`
	CPUs      int    `json:"cpus,omitempty"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	// Services boot before the job VM, on the job's LAN, reachable under their aliases.
	Services []Service `json:"services,omitempty"`
	// Timeout bounds the job from the moment a host takes it; the host reaps it afterwards even
	// when no cleanup came (the runner vanished). 0 takes the host's ci.job_timeout_sec.
	Timeout broker.Duration `json:"timeout,omitempty"`
	// Origin names who asked (the GitLab job URL).
	Origin string `json:"origin,omitempty"`
}

// Service is a sibling VM of the job (GitLab `services:`).
type Service struct {
	Image string `json:"image"`
	// Aliases are the names the job reaches it by (host names on the job's LAN).
	Aliases []string `json:"aliases,omitempty"`
	// Command and Entrypoint override the image's; empty keeps them.
	Entrypoint []string `json:"entrypoint,omitempty"`
	Command    []string `json:"command,omitempty"`
	// Env is KEY=VALUE for the service's entrypoint.
	Env []string `json:"env,omitempty"`
}

// IDPattern is what a job id looks like: it is a subject token, a VM name and a LAN name.
var IDPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,47}$`)

var aliasPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$`)

// ValidAlias reports whether a is usable as a service's host name: lower-case letters, digits,
// '-', '_' and '.', dot-separated labels of 1-63, 253 at most (GitLab's derived names hold '__').
func ValidAlias(a string) bool {
	if len(a) > 253 || !aliasPattern.MatchString(a) {
		return false
	}
	for _, l := range strings.Split(a, ".") {
		if l == "" || len(l) > 63 {
			return false
		}
	}
	return true
}

// Validate checks a spec before it is queued or run.
func (s *Spec) Validate() error {
	if !IDPattern.MatchString(s.ID) {
		return fmt.Errorf("jobs: job id %q: want 1-48 of a-z, 0-9 and -", s.ID)
	}
	if s.Image == "" {
		return fmt.Errorf("jobs: job %s: no image", s.ID)
	}
	if s.CPUs < 0 || s.MemoryMiB < 0 {
		return fmt.Errorf("jobs: job %s: negative cpus or memory", s.ID)
	}
	if len(s.Services) > 16 {
		return fmt.Errorf("jobs: job %s: %d services, at most 16", s.ID, len(s.Services))
	}
	seen := map[string]bool{}
	for i, sv := range s.Services {
		if sv.Image == "" {
			return fmt.Errorf("jobs: job %s: service %d has no image", s.ID, i)
		}
		for _, a := range sv.Aliases {
			if !ValidAlias(a) {
				return fmt.Errorf("jobs: job %s: service alias %q: want a host name (a-z, 0-9, '-', '_', '.')", s.ID, a)
			}
			if seen[a] {
				return fmt.Errorf("jobs: job %s: service alias %q used twice", s.ID, a)
			}
			seen[a] = true
		}
	}
	return nil
}

// Placement is where a started job runs: what the run and cleanup hooks need.
type Placement struct {
	Job  string `json:"job"`
	Host string `json:"host"`
	VM   string `json:"vm"`
	// Ready is when the job VM answered; Queued when Submit queued it.
	Queued time.Time `json:"queued"`
	Ready  time.Time `json:"ready"`
}

// ControlSubject is the core NATS subject on which host serves requests of kind (exec,
// cleanup) for the jobs it runs: vk.ci.<host>.<kind>.
func ControlSubject(host, kind string) string { return "vk.ci." + host + "." + kind }

// ExecRequest asks a host to run a stage script in a job's VM.
type ExecRequest struct {
	Job string `json:"job"`
	// Exec names the output channels (vk.exec.<Exec>.*); unique per call, a subject token.
	Exec  string `json:"exec"`
	Stage string `json:"stage"`
	// Script is the stage script; it is copied into the guest and run with bash (sh without).
	Script []byte `json:"script"`
	// Env is KEY=VALUE on top of the image's environment.
	Env []string `json:"env,omitempty"`
}

// Reply answers a control request.
type Reply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	// Unknown is true when the host has no such job (it was reaped, or never ran here).
	Unknown bool `json:"unknown,omitempty"`
}

// CleanupRequest asks a host to tear job Job down.
type CleanupRequest struct {
	Job string `json:"job"`
	// Failed and ExitCode say how the job ended, for the job.* event.
	Failed   bool `json:"failed,omitempty"`
	ExitCode int  `json:"exit_code,omitempty"`
}

// Exit is the last message of an exec on vk.exec.<exec>.exit.
type Exit struct {
	Code   int `json:"code"`
	Signal int `json:"signal,omitempty"`
	// Error is set when the command could not run or its end is unknown (VM died, agent lost):
	// a system failure, not the script's.
	Error string `json:"error,omitempty"`
}

// Signal is sent by the hook on vk.exec.<exec>.signal as a request: 0 keeps the session alive,
// any other number is delivered to the guest command's process group.
type Signal struct {
	Signal int `json:"signal"`
}

// Errors callers decide on.
var (
	// ErrSystem wraps failures of the infrastructure (host, VM, broker): GitLab should retry.
	ErrSystem = errors.New("system failure")
	// ErrJob wraps failures the job itself caused (a disallowed image, a bad spec).
	ErrJob = errors.New("job failure")
)

// Failure is a job's failure as the job.failed event reports it.
type Failure struct {
	System bool
	Msg    string
}

func (f *Failure) Error() string { return f.Msg }

// Unwrap lets errors.Is tell system from job failures.
func (f *Failure) Unwrap() error {
	if f.System {
		return ErrSystem
	}
	return ErrJob
}

// CancelSubject is where a runner that abandons a job (its prepare hook was killed or timed out)
// says so to every host, with a CleanupRequest body: the host that has the job drops it.
const CancelSubject = "vk.ci.cancel"
