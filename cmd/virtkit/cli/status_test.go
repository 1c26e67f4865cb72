package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// virtkit runs the binary with an empty config and returns stdout, stderr and the exit code.
func virtkit(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "config.toml")
	os.WriteFile(cfg, nil, 0o600)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cmdtest.Binary(t, "virtkit"), args...)
	cmd.Env = append(os.Environ(), "VIRTKIT_CONFIG="+cfg, "VIRTKIT_HOST=testhost")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), errb.String(), 0
	case errors.As(err, &ee):
		return out.String(), errb.String(), ee.ExitCode()
	}
	t.Fatalf("virtkit %v: %v", args, err)
	return "", "", -1
}

func statusJSON(t *testing.T, dir string) *broker.Report {
	t.Helper()
	out, stderr, code := virtkit(t, "status", "--state-dir", dir, "-o", "json")
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, stderr)
	}
	var r broker.Report
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, out)
	}
	return &r
}

func TestServeStatusStop(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds virtkit and runs the daemon")
	}
	dir := t.TempDir()
	d := brokertest.Serve(t, dir, "--heartbeat", "200ms")

	// The host and its workers show up once the first heartbeats are projected.
	var r *broker.Report
	deadline := time.Now().Add(30 * time.Second)
	for {
		r = statusJSON(t, dir)
		if len(r.Hosts) == 1 && len(r.Hosts[0].Workers) == 2 && r.Hosts[0].Workers[0].State == "running" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("host with running workers never shown: %+v", r.Hosts)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !r.Broker.Embedded || r.Broker.PID != d.PID() || !strings.HasPrefix(r.Broker.URL, "nats://127.0.0.1:") || r.Broker.Version == "" {
		t.Errorf("broker %+v", r.Broker)
	}
	names := map[string]broker.StreamStatus{}
	for _, s := range append(r.Streams, r.Buckets...) {
		names[s.Name] = s
	}
	for _, n := range []string{"VIRTKIT_EVENTS", "VIRTKIT_WORK", "VIRTKIT_EXEC", "vk_vms", "vk_images", "vk_jobs", "vk_hosts"} {
		if _, ok := names[n]; !ok {
			t.Errorf("status lacks %s", n)
		}
	}
	if ev := names["VIRTKIT_EVENTS"]; ev.Messages == 0 || ev.Bytes == 0 {
		t.Errorf("VIRTKIT_EVENTS %+v: the heartbeats are not counted", ev)
	}
	if h := r.Hosts[0]; h.ID != "testhost" || h.Capacity != 4 || h.Stopped {
		t.Errorf("host %+v", h)
	}
	if len(r.Problems) > 0 {
		t.Errorf("problems: %v", r.Problems)
	}

	text, _, code := virtkit(t, "status", "--state-dir", dir)
	for _, want := range []string{"(embedded, pid", "VIRTKIT_EVENTS", "vk_hosts", "testhost", "projector:running", "heartbeat:running"} {
		if !strings.Contains(text, want) {
			t.Errorf("status text lacks %q:\n%s", want, text)
		}
	}
	if code != 0 {
		t.Errorf("status exit %d", code)
	}

	// A second daemon on the same state dir is refused.
	if _, stderr, code := virtkit(t, "serve", "--state-dir", dir); code == 0 || !strings.Contains(stderr, "already serves") {
		t.Errorf("second serve: exit %d, %s", code, stderr)
	}

	if err := d.Stop(time.Minute); err != nil {
		t.Fatal(err)
	}
	_, stderr, code := virtkit(t, "status", "--state-dir", dir)
	if code != 3 || !strings.Contains(stderr, "no local daemon") {
		t.Errorf("status without a daemon: exit %d, %s", code, stderr)
	}

	// Restarted with --rebuild-projections: the tables are replaced by a replay of the log.
	d = brokertest.Serve(t, dir, "--rebuild-projections")
	if r := statusJSON(t, dir); len(r.Hosts) != 1 || r.Hosts[0].ID != "testhost" || len(r.Problems) > 0 {
		t.Errorf("after a rebuild: hosts %+v, problems %v", r.Hosts, r.Problems)
	}
	if err := d.Stop(time.Minute); err != nil {
		t.Fatal(err)
	}
	if log, _ := os.ReadFile(d.Log); !strings.Contains(string(log), "rebuilt the state tables") {
		t.Error("serve --rebuild-projections did not log the rebuild")
	}
}

// serve --nats joins an existing server: it provisions there, and local clients find it through
// the endpoint file.
func TestServeExternalBroker(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds virtkit and runs the daemon")
	}
	srv := brokertest.Server(t, "")
	cfg := srv.ClientConfig()
	dir := t.TempDir()
	d := brokertest.Serve(t, dir, "--nats", cfg.URL, "--creds", cfg.NKeySeed)
	r := statusJSON(t, dir)
	if r.Broker.Embedded || r.Broker.URL != cfg.URL {
		t.Errorf("broker %+v, want external %s", r.Broker, cfg.URL)
	}
	c := brokertest.Connect(t, cfg, "probe")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.JetStream().Stream(ctx, broker.EventsStream); err != nil {
		t.Errorf("the daemon did not provision the external server: %v", err)
	}
	if err := d.Stop(time.Minute); err != nil {
		t.Fatal(err)
	}
}

func TestServeBadInput(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds virtkit")
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--nats", "http://127.0.0.1:4222"}, `scheme "http"`},
		{[]string{"--nats", "nats://127.0.0.1:1", "--creds", "/nonexistent/x.creds"}, "/nonexistent/x.creds"},
		{[]string{"--workers", "projector,teleporter"}, `no worker "teleporter"`},
	} {
		_, stderr, code := virtkit(t, append([]string{"serve", "--state-dir", dir}, tc.args...)...)
		if code == 0 || !strings.Contains(stderr, tc.want) {
			t.Errorf("serve %v: exit %d, stderr %q; want an error mentioning %q", tc.args, code, stderr, tc.want)
		}
	}
	if _, err := os.Stat(broker.EndpointPath(dir)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed serve left an endpoint file: %v", err)
	}
}

// An endpoint file left by a crash whose pid now belongs to another process (here: this test)
// does not keep a new daemon from starting.
func TestServeReplacesStaleEndpoint(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds virtkit and runs the daemon")
	}
	dir := t.TempDir()
	stale := broker.Endpoint{Config: broker.Config{URL: "nats://127.0.0.1:1"}, PID: os.Getpid(), Started: time.Now(), Embedded: true}
	if err := broker.WriteEndpoint(dir, stale); err != nil {
		t.Fatal(err)
	}
	d := brokertest.Serve(t, dir)
	if r := statusJSON(t, dir); r.Broker.PID != d.PID() {
		t.Errorf("status shows pid %d, want the new daemon %d", r.Broker.PID, d.PID())
	}
	if err := d.Stop(time.Minute); err != nil {
		t.Fatal(err)
	}
}
