package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// redisImage is a Debian image with redis-server and redis-tools, made once by
// deploy/debian-rootfs.sh (debootstrap; cached under ~/.cache/virtkit/fixtures).
func redisImage(t *testing.T) string {
	t.Helper()
	cache := filepath.Join(os.Getenv("HOME"), ".cache", "virtkit", "fixtures", "debian-bookworm-redis.tar")
	if _, err := os.Stat(cache); err == nil {
		return "tar:" + cache
	}
	cmdtest.RequireRoot(t)
	cmdtest.Tool(t, "debootstrap")
	out, err := exec.Command("../../deploy/debian-rootfs.sh", "debian-bookworm-redis", "redis-server,redis-tools").Output()
	if err != nil {
		t.Fatalf("redis fixture: %v", err)
	}
	return "tar:" + strings.TrimSpace(string(out))
}

const fleetFile = `name: devf
units:
  redis:
    image: %IMAGE%
    memory: 384M
    command: [redis-server, --protected-mode, "no", --dir, /data, --appendonly, "yes", --appendfsync, always]
    volumes:
      - {name: data, path: /data, size: 64M}
    healthcheck:
      test: [redis-cli, ping]
      interval: 500ms
  builder:
    image: %IMAGE%
    mode: agent
    memory: 384M
    depends_on: [redis]
    shares:
      - {host: ./project, guest: /src, uid_map: "0:1000:1", gid_map: "0:1000:1"}
    virtctl: [redis]
`

// TestFleet: a builder and a redis unit on the fleet's LAN; virtctl from the builder stops and
// starts redis with its volume intact; a unit without virtctl permission is refused; the shared
// project folder carries the builder's writes; a restarted daemon resumes the fleet; `up` again
// leaves unchanged units alone; bad files fail with line numbers.
func TestFleet(t *testing.T) {
	v := newVK(t)
	img := redisImage(t)
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "project"), 0o755)
	// The project belongs to a user, as on a workstation, and its path is searchable by them.
	os.Chown(filepath.Join(dir, "project"), 1000, 1000)
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(dir), 0o755)
	file := filepath.Join(dir, "virtkit.yaml")
	os.WriteFile(file, []byte(strings.ReplaceAll(fleetFile, "%IMAGE%", img)), 0o644)

	// A bad file fails before anything runs, with its line.
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("units:\n  web:\n    image: x\n    depends_on: [db]\n"), 0o644)
	if _, stderr, code := v.run("fleet", "up", "-f", bad); code != 2 || !strings.Contains(stderr, "bad.yaml:4") {
		t.Fatalf("bad fleet file: exit %d, stderr %q; want exit 2 and bad.yaml:4", code, stderr)
	}

	stopDaemon := v.daemon()
	t.Cleanup(func() { v.run("fleet", "down", "-f", file) })
	if out, stderr, code := v.run("fleet", "up", "-f", file); code != 0 {
		t.Fatalf("fleet up: exit %d\n%s%s", code, out, stderr)
	}
	ps, _, _ := v.run("fleet", "ps", "-f", file)
	if !regexpMatch(`(?m)^redis\s+redis\s+running\s+healthy\s+\d+\.`, ps) || !regexpMatch(`(?m)^builder\s+builder\s+running`, ps) {
		t.Fatalf("fleet ps:\n%s", ps)
	}
	inBuilder := func(args ...string) (string, string, int) {
		return v.run(append([]string{"fleet", "exec", "-f", file, "builder", "--"}, args...)...)
	}
	mustBuilder := func(want string, args ...string) string {
		t.Helper()
		out, stderr, code := inBuilder(args...)
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("builder %v: exit %d, stdout %q, stderr %q; want %q", args, code, out, stderr, want)
		}
		return out
	}
	mustBuilder("PONG", "redis-cli", "-h", "redis.lan", "ping")
	mustBuilder("OK", "redis-cli", "-h", "redis.lan", "set", "greeting", "kept-on-the-volume")
	// logs: the console and the command's output, each line marked with where it came from.
	if out, stderr, code := v.run("fleet", "logs", "--file", file, "redis"); code != 0 || !strings.Contains(out, "console | ") ||
		!regexpMatch(`(?m)^redis \| .*Ready to accept connections`, out) {
		t.Errorf("fleet logs redis: exit %d, stderr %q, stdout:\n%s", code, stderr, out)
	}

	// The project folder is shared: the builder's writes show on the host.
	mustBuilder("", "sh", "-c", "echo built-in-the-vm > /src/artifact.txt && sync")
	if b, err := os.ReadFile(filepath.Join(dir, "project", "artifact.txt")); err != nil || string(b) != "built-in-the-vm\n" {
		t.Errorf("shared folder: host sees %q, %v", b, err)
	}
	// uid_map/gid_map 0:1000:1: what root makes in the guest belongs to 1000:1000 on the host.
	if fi, err := os.Stat(filepath.Join(dir, "project", "artifact.txt")); err == nil {
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 1000 || st.Gid != 1000 {
			t.Errorf("shared folder: the guest's file is owned by %d:%d on the host, want 1000:1000 (uid_map/gid_map)", st.Uid, st.Gid)
		}
	}

	// virtctl from inside: stop makes redis unreachable, start brings it back with its data.
	mustBuilder("redis stopped", "virtctl", "stop", "redis")
	if out, _, code := inBuilder("redis-cli", "-h", "redis.lan", "ping"); code == 0 && strings.Contains(out, "PONG") {
		t.Fatalf("redis still answers after virtctl stop: %q", out)
	}
	if out, _, code := inBuilder("virtctl", "status", "redis"); code != 3 || !regexpMatch(`(?m)^redis\s+stopped`, out) {
		t.Fatalf("virtctl status of a stopped unit: exit %d, %q; want 3 and stopped", code, out)
	}
	mustBuilder("redis started", "virtctl", "start", "redis")
	mustBuilder("kept-on-the-volume", "redis-cli", "-h", "redis.lan", "get", "greeting")
	mustBuilder("redis", "virtctl", "ls")

	// The builder may control redis only; redis may not use virtctl at all.
	if _, stderr, code := inBuilder("virtctl", "restart", "builder"); code == 0 || !strings.Contains(stderr, "refused") {
		t.Errorf("builder restarting itself: exit %d, %q; want a refusal", code, stderr)
	}
	if _, stderr, code := v.run("fleet", "exec", "-f", file, "redis", "--", "/sbin/virtkit-agent", "virtctl", "stop", "builder"); code != 1 || !strings.Contains(stderr, "may not use virtctl") {
		t.Errorf("virtctl from redis: exit %d, %q; want a refusal", code, stderr)
	}

	// `up` again with the same file leaves both units running as they are.
	_, stderr, code := v.run("fleet", "up", "-f", file)
	if code != 0 || strings.Count(stderr, "unchanged") != 2 {
		t.Fatalf("fleet up again: exit %d, %q; want both units unchanged", code, stderr)
	}

	// A restarted daemon resumes the fleet from its stored definition; the volume persists.
	if err := stopDaemon(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	v.daemon()
	for deadline := time.Now().Add(4 * time.Minute); ; time.Sleep(time.Second) {
		ps, _, _ := v.run("fleet", "ps", "-f", file)
		if regexpMatch(`(?m)^builder\s+builder\s+running`, ps) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restarted daemon did not resume the fleet:\n%s", ps)
		}
	}
	mustBuilder("kept-on-the-volume", "sh", "-c", "for i in $(seq 60); do redis-cli -h redis.lan get greeting && exit 0; sleep 1; done; exit 1")

	if out, stderr, code := v.run("fleet", "down", "-f", file); code != 0 {
		t.Fatalf("fleet down: exit %d\n%s%s", code, out, stderr)
	}
	if _, err := os.Stat(filepath.Join(v.state, "fleets", "devf", "volumes", "redis-data.ext4")); err != nil {
		t.Errorf("volume after down: %v", err)
	}
}

func regexpMatch(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }
