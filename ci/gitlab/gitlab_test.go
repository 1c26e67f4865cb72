package gitlab_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/ci/gitlab"
	"github.com/virtkit/virtkit/ci/jobs"
)

const sampleResponse = `{
  "id": 4242, "token": "tok", "allow_git_fetch": true,
  "job_info": {"name": "test", "stage": "test", "project_id": 7, "project_name": "p"},
  "variables": [
    {"key": "CI_JOB_ID", "value": "4242", "public": true},
    {"key": "DB_PASSWORD", "value": "s3cret-pw", "public": false, "masked": true},
    {"key": "SHORT", "value": "ab", "masked": true},
    {"key": "KUBECONFIG", "value": "apiVersion: v1", "file": true}
  ],
  "image": {"name": "debian:12", "entrypoint": [""]},
  "services": [
    {"name": "postgres:15", "alias": "db,pg", "variables": [{"key": "POSTGRES_PASSWORD", "value": "x"}]},
    {"name": "registry.example.com/team/my_cache:1", "command": ["--port", "6379"]},
    {"name": "docker.io/library/postgres:16", "alias": "old-db"},
    {"name": ""}
  ],
  "runner_info": {"timeout": 3600},
  "some_future_field": {"x": 1}
}`

func loadEnv(t *testing.T, extra ...string) *gitlab.Env {
	t.Helper()
	p := filepath.Join(t.TempDir(), "resp.json")
	if err := os.WriteFile(p, []byte(sampleResponse), 0o600); err != nil {
		t.Fatal(err)
	}
	env, err := gitlab.LoadEnv(append([]string{
		"PATH=/usr/bin", "JOB_RESPONSE_FILE=" + p, "BUILD_FAILURE_EXIT_CODE=11", "SYSTEM_FAILURE_EXIT_CODE=12",
		"CUSTOM_ENV_CI_JOB_ID=4242", "CUSTOM_ENV_CI_SERVER_URL=https://gitlab.example.com",
		"CUSTOM_ENV_CI_JOB_IMAGE=debian:12", "CUSTOM_ENV_WITH_EQUALS=a=b",
	}, extra...))
	if err != nil {
		t.Fatal(err)
	}
	return env
}

func TestLoadEnvAndSpec(t *testing.T) {
	env := loadEnv(t)
	if env.BuildFailure != 11 || env.SystemFailure != 12 {
		t.Fatalf("exit codes %d %d", env.BuildFailure, env.SystemFailure)
	}
	if env.Vars["WITH_EQUALS"] != "a=b" || env.Vars["CI_JOB_ID"] != "4242" {
		t.Fatalf("vars %v", env.Vars)
	}
	key, err := env.Key()
	if err != nil || !strings.HasPrefix(key, "gl") || !strings.HasSuffix(key, "-4242") {
		t.Fatalf("key %q %v", key, err)
	}
	spec, err := env.Spec(key+"-abc", "")
	if err != nil {
		t.Fatal(err)
	}
	want := jobs.Spec{ID: key + "-abc", Image: "debian:12", Timeout: broker.Duration(time.Hour + 5*time.Minute),
		Services: []jobs.Service{
			{Image: "postgres:15", Aliases: []string{"db", "pg", "postgres"}, Env: []string{"POSTGRES_PASSWORD=x"}},
			{Image: "registry.example.com/team/my_cache:1", Aliases: []string{"registry.example.com__team__my_cache", "registry.example.com-team-my_cache", "my_cache"}, Command: []string{"--port", "6379"}},
			// "postgres" is the first service's: the second postgres keeps its other names.
			{Image: "docker.io/library/postgres:16", Aliases: []string{"old-db", "docker.io__library__postgres", "docker.io-library-postgres"}},
		}}
	if !reflect.DeepEqual(spec, want) {
		t.Fatalf("spec\n got %+v\nwant %+v", spec, want)
	}
	// MICROVM_* variables win.
	env = loadEnv(t, "CUSTOM_ENV_MICROVM_IMAGE=tar:/srv/x.tar", "CUSTOM_ENV_MICROVM_CPUS=2", "CUSTOM_ENV_MICROVM_MEM=2G")
	spec, err = env.Spec("j-1", "")
	if err != nil || spec.Image != "tar:/srv/x.tar" || spec.CPUs != 2 || spec.MemoryMiB != 2048 {
		t.Fatalf("spec %+v %v", spec, err)
	}
	for _, bad := range []string{"CUSTOM_ENV_MICROVM_CPUS=many", "CUSTOM_ENV_MICROVM_MEM=lots", "CUSTOM_ENV_MICROVM_CPUS=0"} {
		if _, err := loadEnv(t, bad).Spec("j-1", ""); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

func TestLoadEnvErrors(t *testing.T) {
	for _, environ := range [][]string{
		{"BUILD_FAILURE_EXIT_CODE=x"},
		{"SYSTEM_FAILURE_EXIT_CODE=300"},
		{"JOB_RESPONSE_FILE=/nonexistent/resp.json"},
	} {
		if _, err := gitlab.LoadEnv(environ); err == nil {
			t.Errorf("LoadEnv(%v) accepted", environ)
		}
	}
	env, err := gitlab.LoadEnv(nil)
	if err != nil || env.BuildFailure != 1 || env.SystemFailure != 2 {
		t.Fatalf("defaults %+v %v", env, err)
	}
	if _, err := env.Key(); err == nil {
		t.Error("a key without CI_JOB_ID")
	}
	if _, err := env.Spec("j-1", ""); err == nil {
		t.Error("a spec without any image")
	}
	if s, err := env.Spec("j-1", "debian:12"); err != nil || s.Image != "debian:12" {
		t.Errorf("default image: %+v %v", s, err)
	}
}

func TestSecretsRedacted(t *testing.T) {
	env := loadEnv(t)
	got := env.Secrets.Redact("pull tar:/x/s3cret-pw.tar failed; ab stays")
	if got != "pull tar:/x/[MASKED].tar failed; ab stays" {
		t.Fatalf("redacted %q", got)
	}
}

func TestDriverConfigJSON(t *testing.T) {
	b, _ := json.Marshal(gitlab.NewDriverConfig("1.2.3", "h"))
	var m map[string]any
	json.Unmarshal(b, &m)
	for _, k := range []string{"builds_dir", "cache_dir", "builds_dir_is_shared", "hostname", "driver", "job_env", "shell"} {
		if _, ok := m[k]; !ok {
			t.Errorf("config JSON lacks %s: %s", k, b)
		}
	}
	if d := m["driver"].(map[string]any); d["name"] != "virtkit" || d["version"] != "1.2.3" {
		t.Errorf("driver %v", d)
	}
}

func TestServiceAliasesAndMiB(t *testing.T) {
	for in, want := range map[string][]string{
		"postgres:15":                     {"postgres"},
		"docker.io/library/redis:7":       {"docker.io__library__redis", "docker.io-library-redis", "redis"},
		"docker://tutum/wordpress:latest": {"tutum__wordpress", "tutum-wordpress", "wordpress"},
		"registry.io:5000/team/my_db:1":   {"registry.io__team__my_db", "registry.io-team-my_db", "my_db"},
		"localhost:5000/redis@sha256:abc": {"localhost__redis", "localhost-redis", "redis"},
		"Mongo":                           {"mongo"},
		"tar:/srv/images/redis.tar":       {"redis"},
		"oci:/srv/layouts/cache:v2":       {"cache"},
		"docker-archive:/x/db.tar":        {"db"},
	} {
		if got := gitlab.ServiceAliases(in); !reflect.DeepEqual(got, want) {
			t.Errorf("ServiceAliases(%q) = %q, want %q", in, got, want)
		}
	}
	if got := gitlab.DefaultAlias("registry.io/team/my_db:1"); got != "my_db" {
		t.Errorf("DefaultAlias = %q", got)
	}
	long := strings.Repeat("a", 70) + "/b"
	if got := gitlab.ServiceAliases(long); !reflect.DeepEqual(got, []string{"b"}) {
		t.Errorf("ServiceAliases(%q) = %q: names with labels over 63 bytes must be left out", long, got)
	}
	for in, want := range map[string]int{"512": 512, "512M": 512, "512MiB": 512, "2G": 2048, "2gib": 2048, " 1g ": 1024} {
		if got, err := gitlab.ParseMiB(in); err != nil || got != want {
			t.Errorf("ParseMiB(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0", "-1", "1T", "G", "99999999999G"} {
		if _, err := gitlab.ParseMiB(bad); err == nil {
			t.Errorf("ParseMiB(%q) accepted", bad)
		}
	}
}

func FuzzParseJobResponse(f *testing.F) {
	f.Add([]byte(sampleResponse))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"variables":[{"key":""}]}`))
	f.Add([]byte(`{"runner_info":{"timeout":-1}}`))
	f.Add([]byte(`{"services":[{"name":"a","alias":"x y,z"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		jr, err := gitlab.ParseJobResponse(b)
		if err != nil {
			return
		}
		env := &gitlab.Env{Vars: map[string]string{"CI_JOB_ID": "1", "CI_JOB_IMAGE": "debian"}, Job: jr}
		if s, err := env.Spec("gl1-1-a", ""); err == nil {
			if err := s.Validate(); err != nil {
				t.Fatalf("Spec returned an invalid spec: %v", err)
			}
		}
	})
}

func FuzzParseMiB(f *testing.F) {
	for _, s := range []string{"512", "2G", "1gib", "", "-3M", "9999999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := gitlab.ParseMiB(s)
		if err == nil && n <= 0 {
			t.Fatalf("ParseMiB(%q) = %d", s, n)
		}
	})
}

func FuzzServiceAliases(f *testing.F) {
	for _, s := range []string{"postgres:15", "docker.io/library/redis:7", "registry.io:5000/a/b_c:1@sha256:ab", "tar:/x/y.tar", "oci:/a/b:c", "", ":", "/", "a//b", "UPPER/Case", "x@y"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, image string) {
		seen := map[string]bool{}
		for _, a := range gitlab.ServiceAliases(image) {
			if !jobs.ValidAlias(a) {
				t.Fatalf("ServiceAliases(%q) gave %q, not a valid alias", image, a)
			}
			if seen[a] {
				t.Fatalf("ServiceAliases(%q) gave %q twice", image, a)
			}
			seen[a] = true
		}
	})
}
