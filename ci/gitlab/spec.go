package gitlab

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/ci/jobs"
)

// Variables a job sets to choose its VM.
const (
	VarImage  = "MICROVM_IMAGE" // overrides the job's image:
	VarCPUs   = "MICROVM_CPUS"
	VarMemory = "MICROVM_MEM" // 2048, 512M, 2G
)

// Key names the job's state on the runner machine: stable across the job's hooks, distinct
// across GitLab instances and jobs.
func (e *Env) Key() (string, error) {
	id := e.Vars["CI_JOB_ID"]
	if id == "" && e.Job != nil && e.Job.ID > 0 {
		id = strconv.FormatInt(e.Job.ID, 10)
	}
	if _, err := strconv.ParseUint(id, 10, 63); err != nil {
		return "", fmt.Errorf("gitlab: CUSTOM_ENV_CI_JOB_ID=%q: not a job id (is this run by GitLab Runner?)", id)
	}
	h := sha256.Sum256([]byte(e.Vars["CI_SERVER_URL"]))
	return "gl" + hex.EncodeToString(h[:3]) + "-" + id, nil
}

// Spec builds the job's spec: the image (MICROVM_IMAGE, else the job's image:, else
// defaultImage), size (MICROVM_CPUS, MICROVM_MEM), services and timeout. id must be unique per
// attempt (Key plus a nonce).
func (e *Env) Spec(id, defaultImage string) (jobs.Spec, error) {
	s := jobs.Spec{ID: id, Origin: e.Vars["CI_JOB_URL"]}
	s.Image = firstNonEmpty(e.Vars[VarImage], e.Vars["CI_JOB_IMAGE"])
	if s.Image == "" && e.Job != nil {
		s.Image = e.Job.Image.Name
	}
	if s.Image == "" {
		s.Image = defaultImage
	}
	if s.Image == "" {
		return s, fmt.Errorf("gitlab: the job names no image (image: or %s) and ci.default_image is not set", VarImage)
	}
	if v := e.Vars[VarCPUs]; v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1024 {
			return s, fmt.Errorf("gitlab: %s=%q: want a whole number of vCPUs", VarCPUs, v)
		}
		s.CPUs = n
	}
	if v := e.Vars[VarMemory]; v != "" {
		n, err := ParseMiB(v)
		if err != nil {
			return s, fmt.Errorf("gitlab: %s: %w", VarMemory, err)
		}
		s.MemoryMiB = n
	}
	if e.Job != nil {
		if t := e.Job.RunnerInfo.Timeout; t > 0 {
			// Leave the runner time to call cleanup after its own timeout fired.
			s.Timeout = broker.Duration(time.Duration(t)*time.Second + 5*time.Minute)
		}
		s.Services = services(e.Job.Services)
	}
	return s, s.Validate()
}

// services turns the job's services into specs. Each is reachable under its explicit aliases
// (GitLab's alias: one name, or several separated by commas or spaces) and under the names
// ServiceAliases derives from its image, as GitLab Runner does. A derived name that an explicit
// alias or an earlier service already has is left to that one.
func services(in []Image) []jobs.Service {
	var out []jobs.Service
	taken := map[string]bool{}
	for _, sv := range in {
		if sv.Name == "" {
			continue
		}
		svc := jobs.Service{Image: sv.Name, Entrypoint: sv.Entrypoint, Command: sv.Command}
		for _, v := range sv.Variables {
			svc.Env = append(svc.Env, v.Key+"="+v.Value)
		}
		for _, a := range strings.FieldsFunc(sv.Alias, func(r rune) bool { return r == ',' || r == ' ' }) {
			a = strings.ToLower(a)
			svc.Aliases = append(svc.Aliases, a)
			taken[a] = true
		}
		out = append(out, svc)
	}
	i := 0
	for _, sv := range in {
		if sv.Name == "" {
			continue
		}
		for _, a := range ServiceAliases(sv.Name) {
			if !taken[a] {
				taken[a] = true
				out[i].Aliases = append(out[i].Aliases, a)
			}
		}
		i++
	}
	return out
}

var notHostChar = regexp.MustCompile(`[^a-z0-9._-]+`)

// ServiceAliases are the host names a service gets from its image name, as GitLab Runner derives
// them: the name without tag, digest and registry port, with "/" replaced by "__" and by "-"
// ("registry.example.com:5000/team/db:1" → "registry.example.com__team__db",
// "registry.example.com-team-db"); virtkit adds the last path component ("db"). For the local
// transports (tar:, oci:, docker-archive:) it is the file or folder name without extension or tag.
// Names that cannot be host names are left out.
func ServiceAliases(image string) []string {
	var names []string
	image = strings.TrimPrefix(image, "docker://")
	if t, rest, ok := strings.Cut(image, ":"); ok && (t == "tar" || t == "oci" || t == "docker-archive") {
		base := path.Base(rest)
		if i := strings.Index(base, ":"); i > 0 {
			base = base[:i]
		}
		base = strings.TrimSuffix(strings.TrimSuffix(base, ".tar"), ".tgz")
		names = []string{base}
	} else {
		name, _, _ := strings.Cut(image, "@")
		if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
			name = name[:i] // the tag
		}
		if first, rest, ok := strings.Cut(name, "/"); ok {
			host, _, _ := strings.Cut(first, ":") // a registry port
			name = host + "/" + rest
		}
		names = []string{strings.ReplaceAll(name, "/", "__"), strings.ReplaceAll(name, "/", "-"), path.Base(name)}
	}
	var out []string
	for _, n := range names {
		n = strings.Trim(notHostChar.ReplaceAllString(strings.ToLower(n), "-"), "-._")
		if jobs.ValidAlias(n) && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// DefaultAlias is a service's short host name: the last component of its image name
// ("postgres:15" → "postgres"), "" when it has none usable.
func DefaultAlias(image string) string {
	a := ServiceAliases(image)
	if len(a) == 0 {
		return ""
	}
	return a[len(a)-1]
}

// ParseMiB reads a memory size: 2048 (MiB), 512M, 512MiB, 2G, 2GiB.
func ParseMiB(s string) (int, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	mult := 1
	switch {
	case strings.HasSuffix(t, "G"):
		mult, t = 1024, strings.TrimSuffix(t, "G")
	case strings.HasSuffix(t, "M"):
		t = strings.TrimSuffix(t, "M")
	}
	n, err := strconv.Atoi(t)
	if err != nil || n <= 0 || n > 1<<30/mult {
		return 0, fmt.Errorf("%q: want a size like 512M or 2G", s)
	}
	return n * mult, nil
}

func firstNonEmpty(v ...string) string {
	for _, s := range v {
		if s != "" {
			return s
		}
	}
	return ""
}
