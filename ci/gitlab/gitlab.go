// Package gitlab is GitLab Runner's custom executor contract for virtkit: the config stage's
// JSON, the job's environment (CUSTOM_ENV_* variables, the job response file, the exit codes the
// runner wants), the job spec a job's variables ask for, and the four hooks (config, prepare,
// run, cleanup) on top of package ci/jobs.
//
// Secrets: the values of masked variables in the job response are redacted from everything the
// hooks print or log (Secrets.Redact); variable values are never logged otherwise.
//
// Concurrency: the hooks are one-shot processes; Hooks is used from one goroutine.
package gitlab

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
)

// Env is what GitLab Runner hands a hook in its environment.
type Env struct {
	// Vars are the job's variables: CUSTOM_ENV_X=V becomes Vars["X"] = V.
	Vars map[string]string
	// BuildFailure and SystemFailure are the exit codes for a failing script and for an
	// infrastructure fault (BUILD_FAILURE_EXIT_CODE, SYSTEM_FAILURE_EXIT_CODE).
	BuildFailure, SystemFailure int
	// Job is the parsed JOB_RESPONSE_FILE, nil when the runner gave none.
	Job *JobResponse
	// Secrets are the masked variables' values.
	Secrets Secrets
}

// LoadEnv reads environ (os.Environ()) and the job response file it names.
func LoadEnv(environ []string) (*Env, error) {
	e := &Env{Vars: map[string]string{}, BuildFailure: 1, SystemFailure: 2}
	var respFile string
	for _, kv := range environ {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		switch {
		case strings.HasPrefix(k, "CUSTOM_ENV_"):
			e.Vars[strings.TrimPrefix(k, "CUSTOM_ENV_")] = v
		case k == "BUILD_FAILURE_EXIT_CODE" || k == "SYSTEM_FAILURE_EXIT_CODE":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > 255 {
				return nil, fmt.Errorf("gitlab: %s=%q: not an exit code", k, v)
			}
			if k == "BUILD_FAILURE_EXIT_CODE" {
				e.BuildFailure = n
			} else {
				e.SystemFailure = n
			}
		case k == "JOB_RESPONSE_FILE":
			respFile = v
		}
	}
	if respFile != "" {
		b, err := os.ReadFile(respFile)
		if err != nil {
			return e, fmt.Errorf("gitlab: job response: %w", err)
		}
		jr, err := ParseJobResponse(b)
		if err != nil {
			return e, err
		}
		e.Job = jr
		for _, v := range jr.Variables {
			if v.Masked {
				e.Secrets = append(e.Secrets, v.Value)
			}
		}
		e.Secrets.sort()
	}
	return e, nil
}

// JobResponse is the part of GitLab's job payload (JOB_RESPONSE_FILE) the hooks use.
type JobResponse struct {
	ID         int64      `json:"id"`
	Variables  []Variable `json:"variables"`
	Image      Image      `json:"image"`
	Services   []Image    `json:"services"`
	RunnerInfo struct {
		Timeout int `json:"timeout"`
	} `json:"runner_info"`
	JobInfo struct {
		Name        string `json:"name"`
		Stage       string `json:"stage"`
		ProjectID   int64  `json:"project_id"`
		ProjectName string `json:"project_name"`
	} `json:"job_info"`
}

// Variable is one job variable.
type Variable struct {
	Key    string `json:"key"`
	Value  string `json:"value"`
	Public bool   `json:"public"`
	Masked bool   `json:"masked"`
	File   bool   `json:"file"`
	Raw    bool   `json:"raw"`
}

// Image is a job's image or one of its services.
type Image struct {
	Name       string     `json:"name"`
	Alias      string     `json:"alias"`
	Entrypoint []string   `json:"entrypoint"`
	Command    []string   `json:"command"`
	Variables  []Variable `json:"variables"`
}

// MaxJobResponse bounds the job response file.
const MaxJobResponse = 16 << 20

// ParseJobResponse parses a job response. Unknown fields are ignored (GitLab adds fields often);
// wrong types and missing keys of variables are errors.
func ParseJobResponse(b []byte) (*JobResponse, error) {
	if len(b) > MaxJobResponse {
		return nil, fmt.Errorf("gitlab: job response of %d bytes is larger than %d", len(b), MaxJobResponse)
	}
	var jr JobResponse
	if err := json.Unmarshal(b, &jr); err != nil {
		return nil, fmt.Errorf("gitlab: job response: %w", err)
	}
	for i, v := range jr.Variables {
		if v.Key == "" {
			return nil, fmt.Errorf("gitlab: job response: variable %d has no key", i)
		}
	}
	if jr.RunnerInfo.Timeout < 0 {
		return nil, errors.New("gitlab: job response: negative runner_info.timeout")
	}
	return &jr, nil
}

// Secrets are values that must never be printed.
type Secrets []string

func (s Secrets) sort() {
	// Longest first, so a secret that contains another is redacted whole.
	sort.Slice(s, func(i, j int) bool { return len(s[i]) > len(s[j]) })
}

// Redact replaces every secret in text with [MASKED]. Values shorter than 4 bytes are left alone
// (GitLab refuses to mask them too; redacting them would garble every message).
func (s Secrets) Redact(text string) string {
	for _, v := range s {
		if len(v) >= 4 {
			text = strings.ReplaceAll(text, v, "[MASKED]")
		}
	}
	return text
}

// DriverConfig is the JSON the config stage prints.
type DriverConfig struct {
	BuildsDir         string            `json:"builds_dir"`
	CacheDir          string            `json:"cache_dir"`
	BuildsDirIsShared bool              `json:"builds_dir_is_shared"`
	Hostname          string            `json:"hostname,omitempty"`
	Driver            Driver            `json:"driver"`
	JobEnv            map[string]string `json:"job_env,omitempty"`
	Shell             string            `json:"shell,omitempty"`
}

// Driver names the executor in the job log.
type Driver struct {
	Name    string `json:"name"`
	Version string `json:"version"`
}

// NewDriverConfig is virtkit's config stage answer: builds and cache inside the throwaway VM
// (never shared between jobs), the bash shell.
func NewDriverConfig(version, hostname string) DriverConfig {
	return DriverConfig{
		BuildsDir: "/builds", CacheDir: "/cache", BuildsDirIsShared: false, Hostname: hostname,
		Driver: Driver{Name: "virtkit", Version: version},
		JobEnv: map[string]string{"VIRTKIT_EXECUTOR": "microvm"},
		Shell:  "bash",
	}
}
