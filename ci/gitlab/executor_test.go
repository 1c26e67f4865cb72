package gitlab_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/ci/gitlab"
	"github.com/virtkit/virtkit/ci/jobs/jobstest"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/imagetest"
)

// Exit codes as a runner would set them; not 1 and 2, so the hooks must read them.
const (
	buildFailure  = 71
	systemFailure = 72
	secret        = "hunter2-very-secret"
)

// host is `virtkit serve` with the CI worker, as a child process joined to the cluster.
type host struct {
	t     *testing.T
	name  string
	state string
	cfg   string
	log   string
	cmd   *exec.Cmd
	done  chan struct{}
}

type fixture struct {
	t       *testing.T
	bin     string
	cluster *jobstest.Cluster
	image   string // tar: reference of the Debian fixture
	imgDir  string
	runner  string // the runner machine's config
	hosts   map[string]*host
	// wrap prefixes the hooks' command line (ip netns exec NS).
	wrap []string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	cmdtest.Heavy(t)
	kernel := cmdtest.Kernel(t)
	cmdtest.Tool(t, "qemu-system-x86_64")
	tarball := imagetest.DebianRootfs(t) // debootstrap once, cached
	bin := cmdtest.Binary(t, "virtkit")
	cmdtest.Binary(t, "virtkit-agent") // next to virtkit: injected into images
	f := &fixture{t: t, bin: bin, cluster: jobstest.NewCluster(t, 3), image: "tar:" + tarball, imgDir: filepath.Dir(tarball), hosts: map[string]*host{}}
	root := t.TempDir()
	f.runner = filepath.Join(root, "runner.toml")
	writeFile(t, f.runner, fmt.Sprintf("state_dir = %q\n[nats]\nurl = %q\n", filepath.Join(root, "runner-state"), f.cluster.URL()))
	for _, name := range []string{"vk-a", "vk-b"} {
		h := &host{t: t, name: name, state: filepath.Join(root, name), cfg: filepath.Join(root, name+".toml")}
		writeFile(t, h.cfg, fmt.Sprintf(`state_dir = %q
host = %q
[nats]
url = %q
[vm]
kernel = %q
memory_mib = 256
capacity = 2
[ci]
allowed_registries = ["tar:%s"]
job_timeout_sec = 900
`, h.state, name, f.cluster.URL(), kernel, f.imgDir))
		f.hosts[name] = h
	}
	return f
}

func writeFile(t *testing.T, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) start(name string) *host {
	t := f.t
	h := f.hosts[name]
	logf, err := os.OpenFile(filepath.Join(filepath.Dir(h.state), name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	h.log = logf.Name()
	h.cmd = exec.Command(f.bin, "serve", "--replicas", "3", "--workers", "projector,heartbeat,ci", "--log-level", "debug")
	h.cmd.Env = append(os.Environ(), "VIRTKIT_CONFIG="+h.cfg)
	h.cmd.Stdout, h.cmd.Stderr = logf, logf
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h.done = make(chan struct{})
	go func() { h.cmd.Wait(); close(h.done) }()
	t.Cleanup(func() {
		h.kill()
		if t.Failed() {
			b, _ := os.ReadFile(h.log)
			if len(b) > 30000 {
				b = b[len(b)-30000:]
			}
			t.Logf("%s log:\n%s", name, b)
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if ep, err := broker.ReadEndpoint(h.state); err == nil && ep.PID == h.cmd.Process.Pid {
			return h
		}
		select {
		case <-h.done:
			b, _ := os.ReadFile(h.log)
			t.Fatalf("%s exited at start:\n%s", name, b)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready after 60s", name)
		}
	}
}

func (h *host) kill() {
	select {
	case <-h.done:
	default:
		h.cmd.Process.Signal(syscall.SIGKILL)
		<-h.done
	}
}

// ciVMs lists the VM folders the host's CI worker has.
func (h *host) ciVMs() []string {
	ents, _ := os.ReadDir(filepath.Join(h.state, "ci", "vms"))
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// job is one GitLab job as the runner sees it: its environment and response file.
type job struct {
	f   *fixture
	id  int
	env []string
}

func (f *fixture) job(id int, vars map[string]string) *job { return f.jobWith(id, vars, nil) }

// jobWith is job with the job response's services array.
func (f *fixture) jobWith(id int, vars map[string]string, services []map[string]any) *job {
	dir := f.t.TempDir()
	resp := map[string]any{
		"id": id, "token": "job-token",
		"variables": []map[string]any{
			{"key": "CI_JOB_ID", "value": fmt.Sprint(id), "public": true},
			{"key": "SECRET_TOKEN", "value": secret, "public": false, "masked": true},
		},
		"image":       map[string]any{"name": ""},
		"runner_info": map[string]any{"timeout": 600},
		"job_info":    map[string]any{"name": "test", "stage": "test", "project_id": 7, "project_name": "p"},
	}
	if services != nil {
		resp["services"] = services
	}
	b, _ := json.Marshal(resp)
	respFile := filepath.Join(dir, "response.json")
	writeFile(f.t, respFile, string(b))
	env := append(os.Environ(),
		"VIRTKIT_CONFIG="+f.runner,
		"JOB_RESPONSE_FILE="+respFile,
		fmt.Sprintf("BUILD_FAILURE_EXIT_CODE=%d", buildFailure),
		fmt.Sprintf("SYSTEM_FAILURE_EXIT_CODE=%d", systemFailure),
		fmt.Sprintf("CUSTOM_ENV_CI_JOB_ID=%d", id),
		"CUSTOM_ENV_CI_SERVER_URL=https://gitlab.example.com",
		fmt.Sprintf("CUSTOM_ENV_CI_JOB_URL=https://gitlab.example.com/g/p/-/jobs/%d", id),
		"CUSTOM_ENV_CI_JOB_IMAGE="+f.image,
		"CUSTOM_ENV_SECRET_TOKEN="+secret,
	)
	for k, v := range vars {
		env = append(env, "CUSTOM_ENV_"+k+"="+v)
	}
	return &job{f: f, id: id, env: env}
}

type result struct {
	code   int
	stdout string
	stderr string
}

// hook runs `virtkit gitlab ARGS…` as GitLab Runner does (its own process group, so a signal
// goes to the hook only).
func (j *job) start(args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	argv := append(append(append([]string{}, j.f.wrap...), j.f.bin, "gitlab"), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = j.env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &syncWriter{w: &out}, &syncWriter{w: &errb}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		j.f.t.Fatal(err)
	}
	return cmd, &out, &errb
}

var outMu sync.Mutex

type syncWriter struct{ w *bytes.Buffer }

func (s *syncWriter) Write(p []byte) (int, error) {
	outMu.Lock()
	defer outMu.Unlock()
	return s.w.Write(p)
}

func snapshot(b *bytes.Buffer) string { outMu.Lock(); defer outMu.Unlock(); return b.String() }

func wait(cmd *exec.Cmd, out, errb *bytes.Buffer) result {
	cmd.Wait()
	return result{code: cmd.ProcessState.ExitCode(), stdout: snapshot(out), stderr: snapshot(errb)}
}

func (j *job) hook(args ...string) result {
	return wait(j.start(args...))
}

// script writes a stage script the way GitLab Runner's bash shell does: errexit/pipefail, the
// job's variables exported, and the commands eval'd with stdin closed.
func (j *job) script(stage, body string) string {
	var cmds strings.Builder
	cmds.WriteString(fmt.Sprintf("export CI_JOB_ID='%d'\nexport SECRET_TOKEN='%s'\n", j.id, secret))
	cmds.WriteString("echo $'\\x1b[32;1m$ " + strings.ReplaceAll(stage, "'", "") + "\\x1b[0;m'\n")
	cmds.WriteString(body)
	s := "#!/usr/bin/env bash\n\n" +
		"if set -o | grep pipefail > /dev/null; then set -o pipefail; fi; set -o errexit\n" +
		"set +o noclobber\n" +
		": | eval " + ansiQuote(cmds.String()) + "\n" +
		"exit 0\n"
	p := filepath.Join(j.f.t.TempDir(), "script-"+stage)
	writeFile(j.f.t, p, s)
	return p
}

// ansiQuote is bash's $'…' quoting, as the runner uses for eval'd scripts.
func ansiQuote(s string) string {
	var b strings.Builder
	b.WriteString("$'")
	for _, r := range s {
		switch r {
		case '\\':
			b.WriteString(`\\`)
		case '\'':
			b.WriteString(`\'`)
		case '\n':
			b.WriteString(`\n`)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteString("'")
	return b.String()
}

func (j *job) run(stage, body string) result {
	return j.hook("run", j.script(stage, body), stage)
}

func check(t *testing.T, what string, r result, code int, contains ...string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("%s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", what, r.code, code, r.stdout, r.stderr)
	}
	for _, c := range contains {
		if !strings.Contains(r.stdout+r.stderr, c) {
			t.Fatalf("%s: output lacks %q\nstdout:\n%s\nstderr:\n%s", what, c, r.stdout, r.stderr)
		}
	}
	if strings.Contains(r.stderr, secret) || strings.Contains(r.stdout, secret) && !strings.Contains(what, "echo-secret") {
		t.Fatalf("%s: the masked variable's value leaked into the hook's output", what)
	}
}

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestExecutorOnMicroVMs drives the hooks exactly as GitLab Runner does, against two hosts on a
// 3-node NATS cluster, with real microVMs.
func TestExecutorOnMicroVMs(t *testing.T) {
	f := newFixture(t)
	a := f.start("vk-a")
	b := f.start("vk-b")

	t.Run("config", func(t *testing.T) {
		r := f.job(100, nil).hook("config")
		check(t, "config", r, 0)
		var dc gitlab.DriverConfig
		if err := json.Unmarshal([]byte(r.stdout), &dc); err != nil {
			t.Fatalf("config output %q: %v", r.stdout, err)
		}
		if dc.BuildsDir == "" || dc.CacheDir == "" || dc.BuildsDirIsShared || dc.Driver.Name != "virtkit" || dc.Shell != "bash" {
			t.Fatalf("config %+v", dc)
		}
	})

	t.Run("pass", func(t *testing.T) {
		j := f.job(101, nil)
		check(t, "prepare", j.hook("prepare"), 0, "Running on host")
		check(t, "prepare_script", j.run("prepare_script", `echo "Running on $(hostname) via virtkit"`+"\n"), 0, "via virtkit")
		check(t, "get_sources", j.run("get_sources", "mkdir -p /builds/g/p && cd /builds/g/p && echo src > file\n"), 0)
		check(t, "unknown stage", j.run("step_release_notes", "echo custom step ran\n"), 0, "custom step ran")
		check(t, "build_script", j.run("build_script", "cd /builds/g/p && cat file && uname -s && head -1 /etc/os-release\n"), 0, "src", "Linux", "Debian")
		check(t, "after_script", j.run("after_script", "echo after\n"), 0, "after")
		check(t, "cleanup", j.hook("cleanup"), 0)
		waitFor(t, "no CI VM left", 30*time.Second, func() bool { return len(a.ciVMs())+len(b.ciVMs()) == 0 })
	})

	t.Run("fail", func(t *testing.T) {
		j := f.job(102, nil)
		check(t, "prepare", j.hook("prepare"), 0)
		check(t, "build_script", j.run("build_script", "echo before the failure\nfalse\necho never\n"), buildFailure, "before the failure")
		if r := j.run("after_script", "echo after the failure\n"); r.code != 0 || strings.Contains(r.stdout, "never") {
			t.Fatalf("after_script %+v", r)
		}
		check(t, "cleanup", j.hook("cleanup"), 0)
	})

	t.Run("cannot boot", func(t *testing.T) {
		// The image cannot be had (a registry or disk fault): a system failure, retried by GitLab.
		// Its reference holds the masked value, which must not reach the job log.
		j := f.job(103, map[string]string{"MICROVM_IMAGE": "tar:" + filepath.Join(f.imgDir, "missing-"+secret+".tar")})
		r := j.hook("prepare")
		check(t, "prepare", r, systemFailure, "[MASKED]")
		check(t, "cleanup", j.hook("cleanup"), 0)
		// A job asking for what the hosts forbid is the job's fault.
		check(t, "prepare (disallowed image)", f.job(104, map[string]string{"MICROVM_IMAGE": "docker.io/library/debian:12"}).hook("prepare"), buildFailure, "not allowed")
		check(t, "prepare (too big)", f.job(105, map[string]string{"MICROVM_MEM": "64G"}).hook("prepare"), buildFailure, "allows at most")
	})

	t.Run("cancel", func(t *testing.T) {
		j := f.job(106, nil)
		check(t, "prepare", j.hook("prepare"), 0)
		// Graceful kill: SIGTERM to the hook reaches the guest's process group.
		cmd, out, errb := j.start("run", j.script("build_script", "trap 'echo got TERM; exit 143' TERM\nsleep 600 &\necho started\nwait\n"), "build_script")
		waitFor(t, "the stage to start", 60*time.Second, func() bool { return strings.Contains(snapshot(out), "started") })
		cmd.Process.Signal(syscall.SIGTERM)
		check(t, "run after SIGTERM", wait(cmd, out, errb), buildFailure, "got TERM")
		// Force kill: the hook dies without a word; the host kills the stage when its lease runs
		// out, and cleanup still works.
		cmd, out, errb = j.start("run", j.script("build_script", "echo started; sleep 600\n"), "build_script")
		waitFor(t, "the stage to start", 60*time.Second, func() bool { return strings.Contains(snapshot(out), "started") })
		cmd.Process.Signal(syscall.SIGKILL)
		wait(cmd, out, errb)
		r := j.run("after_script", "for i in $(seq 1 60); do grep -qx sleep /proc/[0-9]*/comm 2>/dev/null || { echo no sleep left; exit 0; }; sleep 1; done; echo sleep still runs; exit 1\n")
		check(t, "stage killed after the hook vanished", r, 0, "no sleep left")
		check(t, "cleanup", j.hook("cleanup"), 0)
		waitFor(t, "no CI VM left", 30*time.Second, func() bool { return len(a.ciVMs())+len(b.ciVMs()) == 0 })
	})
}

// processesUnder lists processes whose command line mentions dir.
func processesUnder(dir string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(dir+"/")) {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil && bytes.Contains(st, []byte(") Z ")) {
			continue
		}
		out = append(out, e.Name()+": "+strings.ReplaceAll(string(b), "\x00", " "))
	}
	return out
}

// placement reads the job id prepare recorded on the runner machine.
func (f *fixture) placement(t *testing.T, id int) (jobID, host string) {
	t.Helper()
	matches, _ := filepath.Glob(filepath.Join(filepath.Dir(f.runner), "runner-state", "ci", fmt.Sprintf("gl*-%d.json", id)))
	if len(matches) != 1 {
		t.Fatalf("job %d: %d state files", id, len(matches))
	}
	b, err := os.ReadFile(matches[0])
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Job  string `json:"job"`
		Host string `json:"host"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st.Job, st.Host
}

// TestPoolOnMicroVMs: two hosts drain 20 queued jobs with none lost or run twice while a NATS
// node dies; then a host dies mid-job: only its jobs fail (as system failures), and it leaves no
// VM, process or file behind.
func TestPoolOnMicroVMs(t *testing.T) {
	f := newFixture(t)
	a := f.start("vk-a")
	f.start("vk-b")

	t.Run("drain 20 jobs, lose a NATS node", func(t *testing.T) {
		var wg sync.WaitGroup
		var mu sync.Mutex
		done := 0
		perHost := map[string]int{}
		errs := make(chan string, 60)
		killed := make(chan struct{})
		for i := range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				j := f.job(200+i, nil)
				r := j.hook("prepare")
				if r.code != 0 {
					errs <- fmt.Sprintf("job %d prepare: %d %s %s", j.id, r.code, r.stdout, r.stderr)
					return
				}
				for _, h := range []string{"vk-a", "vk-b"} {
					if strings.Contains(r.stdout, "host "+h+" ") {
						mu.Lock()
						perHost[h]++
						mu.Unlock()
					}
				}
				r = j.run("build_script", "echo ran-$CI_JOB_ID-once\n")
				if r.code != 0 || strings.Count(r.stdout, fmt.Sprintf("ran-%d-once", j.id)) != 1 {
					errs <- fmt.Sprintf("job %d run: %d %q %s", j.id, r.code, r.stdout, r.stderr)
				}
				if r := j.hook("cleanup"); r.code != 0 {
					errs <- fmt.Sprintf("job %d cleanup: %d", j.id, r.code)
				}
				mu.Lock()
				done++
				if done == 6 {
					close(killed)
				}
				mu.Unlock()
			}()
		}
		go func() {
			select {
			case <-killed:
				t.Log("killing NATS node n1")
				f.cluster.Kill(0)
			case <-time.After(10 * time.Minute):
			}
		}()
		wg.Wait()
		close(errs)
		for e := range errs {
			t.Error(e)
		}
		t.Logf("jobs per host: %v", perHost)
		if perHost["vk-a"] == 0 || perHost["vk-b"] == 0 || perHost["vk-a"]+perHost["vk-b"] != 20 {
			t.Errorf("jobs per host %v: want all 20 placed, on both hosts", perHost)
		}
	})

	t.Run("a host dies mid-job", func(t *testing.T) {
		type running struct {
			j        *job
			cmd      *exec.Cmd
			out, err *bytes.Buffer
			host     string
		}
		var rs []*running
		for i := range 4 {
			j := f.job(300+i, nil)
			check(t, "prepare", j.hook("prepare"), 0)
			_, h := f.placement(t, j.id)
			cmd, out, errb := j.start("run", j.script("build_script", "echo started; sleep 45; echo finished\n"), "build_script")
			rs = append(rs, &running{j: j, cmd: cmd, out: out, err: errb, host: h})
		}
		for _, r := range rs {
			waitFor(t, "stages to start", 2*time.Minute, func() bool { return strings.Contains(snapshot(r.out), "started") })
		}
		t.Log("killing host vk-a")
		a.kill()
		onA := 0
		var deadJobs []string
		for _, r := range rs {
			if r.host == "vk-a" {
				id, _ := f.placement(t, r.j.id)
				deadJobs = append(deadJobs, id)
			}
		}
		for _, r := range rs {
			res := wait(r.cmd, r.out, r.err)
			if r.host == "vk-a" {
				onA++
				check(t, fmt.Sprintf("job %d on the dead host", r.j.id), res, systemFailure)
			} else {
				check(t, fmt.Sprintf("job %d on the live host", r.j.id), res, 0, "finished")
			}
			check(t, "cleanup", r.j.hook("cleanup"), 0)
		}
		if onA == 0 || onA == 4 {
			t.Fatalf("%d of 4 jobs on vk-a; the test needs both hosts busy", onA)
		}
		// Their work items come back after the ack wait; they are failed as system failures, never
		// started again.
		c := connect(t, f.cluster.URL())
		for _, id := range deadJobs {
			waitFor(t, "job "+id+" failed as a system failure", 3*time.Minute, func() bool {
				evs := events(t, c, id)
				started, system := 0, false
				for _, ev := range evs {
					switch e := ev.(type) {
					case *broker.JobStarted:
						started++
					case *broker.JobFailed:
						system = system || e.System
					}
				}
				if started > 1 {
					t.Fatalf("job %s started %d times", id, started)
				}
				return system
			})
		}
		// The dead host's VMs died with it (parent-death signal).
		waitFor(t, "no process of the dead host", 30*time.Second, func() bool { return len(processesUnder(a.state)) == 0 })
		// Restarted, it reconciles its leftover VM folders away.
		f.start("vk-a")
		waitFor(t, "no VM folder left on vk-a", 60*time.Second, func() bool { return len(a.ciVMs()) == 0 })
		if p := processesUnder(a.state + "/ci"); len(p) != 0 {
			t.Fatalf("processes left: %v", p)
		}
	})
}

func connect(t *testing.T, url string) *broker.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := broker.Connect(ctx, broker.Config{URL: url, Host: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// events reads job id's events so far.
func events(t *testing.T, c *broker.Client, id string) []broker.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var mu sync.Mutex
	var out []broker.Event
	sub, err := c.Subscribe(ctx, broker.SubscribeOptions{Filters: []string{broker.EventFilter("job", id, "")}},
		func(_ context.Context, _ *broker.Envelope, ev broker.Event) error {
			mu.Lock()
			out = append(out, ev)
			mu.Unlock()
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	sub.Stop()
	mu.Lock()
	defer mu.Unlock()
	return out
}
