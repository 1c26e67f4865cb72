package main

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// redisImage is a Debian image with redis-server, redis-tools and openssh-server, made once by
// deploy/debian-rootfs.sh (debootstrap; cached under ~/.cache/virtkit/fixtures).
func redisImage(t *testing.T) string {
	t.Helper()
	cache := filepath.Join(os.Getenv("HOME"), ".cache", "virtkit", "fixtures", "debian-bookworm-redis-ssh.tar")
	if _, err := os.Stat(cache); err == nil {
		return "tar:" + cache
	}
	cmdtest.RequireRoot(t)
	cmdtest.Tool(t, "debootstrap")
	out, err := exec.Command("../../deploy/debian-rootfs.sh", "debian-bookworm-redis-ssh", "redis-server,redis-tools,openssh-server").Output()
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
    env: {FLEET_ROLE: "cache with spaces"}
    volumes:
      - {name: data, path: /data, size: 64M}
    ports: ["127.0.0.1:%PORT%:6379"]
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
    ssh_keys: ["@./id_fleet.pub"]
    virtctl: [redis]
`

// otherFleet has a unit called redis too, on a subnet of its own.
const otherFleet = `name: devg
subnet: 10.78.0.0/24
units:
  redis:
    image: %IMAGE%
    memory: 256M
    command: [sh, -c, 'echo "entrypoint env: $ROLE"; exec redis-server --protected-mode no --save ""']
    env: {ROLE: "the second fleet's"}
    healthcheck: {test: [redis-cli, ping], interval: 500ms}
`

// TestFleet: a builder and a redis unit on the fleet's LAN; redis runs as its VM's entrypoint
// (its exit stops the unit) with the unit's env and its volume mounted at boot; its port is
// forwarded to the host; the builder takes ssh with the fleet file's key; virtctl from the builder
// stops and starts redis with its volume intact; a unit without virtctl permission is refused; the
// shared project folder carries the builder's writes; a second fleet with its own redis on its own
// subnet resolves its own redis.lan; a restarted daemon resumes the fleet; `up` again leaves
// unchanged units alone; bad files fail with line numbers.
func TestFleet(t *testing.T) {
	v := newVK(t)
	img := redisImage(t)
	cmdtest.Tool(t, "ssh")
	cmdtest.Tool(t, "ssh-keygen")
	dir := t.TempDir()
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-test", "-f", filepath.Join(dir, "id_fleet")).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	port := freePort(t)
	os.MkdirAll(filepath.Join(dir, "project"), 0o755)
	// The project belongs to a user, as on a workstation, and its path is searchable by them.
	os.Chown(filepath.Join(dir, "project"), 1000, 1000)
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(dir), 0o755)
	file := filepath.Join(dir, "virtkit.yaml")
	os.WriteFile(file, []byte(strings.NewReplacer("%IMAGE%", img, "%PORT%", port).Replace(fleetFile)), 0o644)

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
	// VMs are <fleet>-<unit> on the host.
	ps, _, _ := v.run("fleet", "ps", "-f", file)
	if !regexpMatch(`(?m)^redis\s+devf-redis\s+running\s+healthy\s+10\.77\.0\.\d+`, ps) || !regexpMatch(`(?m)^builder\s+devf-builder\s+running`, ps) {
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
	// logs: the console, where the entrypoint (redis) writes beside the agent.
	if out, stderr, code := v.run("fleet", "logs", "--file", file, "redis"); code != 0 || !regexpMatch(`(?m)^redis \| virtkit: serving on`, out) ||
		!regexpMatch(`(?m)^redis \| .*Ready to accept connections`, out) {
		t.Errorf("fleet logs redis: exit %d, stderr %q, stdout:\n%s", code, stderr, out)
	}
	// redis-server is the VM's entrypoint (a child of the agent's PID 1); exec sessions start from
	// the unit's env. (redis rewrites its environ for its process title: the second fleet shows
	// the env reaching an entrypoint.)
	if out, stderr, code := v.run("fleet", "exec", "-f", file, "redis", "--", "sh", "-c",
		`for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = redis-server ] && echo ppid=$(cut -d' ' -f4 $p/stat); done; echo "exec=$FLEET_ROLE"`); code != 0 ||
		!strings.Contains(out, "ppid=1\n") || !strings.Contains(out, "exec=cache with spaces") {
		t.Errorf("redis entrypoint: exit %d, stderr %q, stdout:\n%s", code, stderr, out)
	}
	// ports: the unit's 6379 is forwarded to the host.
	if got := redisPing(t, "127.0.0.1:"+port); got != "+PONG" {
		t.Errorf("redis through the host port forward: %q, want +PONG", got)
	}
	// ssh_keys: the builder runs sshd with the file's key; fleet ssh uses it (the private half
	// beside the .pub), tunnelled through the agent.
	if out, stderr, code := v.run("fleet", "ssh", "-f", file, "builder", "--", "echo", "host=$(hostname)", "ssh=${SSH_CONNECTION:+yes}"); code != 0 || !strings.Contains(out, "host=builder ssh=yes") {
		t.Errorf("fleet ssh builder: exit %d, stderr %q, stdout %q", code, stderr, out)
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

	// The entrypoint's exit is the unit's exit: redis shutting down stops the unit.
	inBuilder("redis-cli", "-h", "redis.lan", "shutdown")
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		out, _, code := inBuilder("virtctl", "status", "redis")
		if code == 3 && regexpMatch(`(?m)^redis\s+stopped`, out) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis exited but its unit did not stop: %q", out)
		}
	}
	mustBuilder("redis started", "virtctl", "start", "redis")
	mustBuilder("kept-on-the-volume", "redis-cli", "-h", "redis.lan", "get", "greeting")

	// A second fleet with a unit called redis, on its own subnet: each fleet's redis.lan is its own.
	other := filepath.Join(dir, "other.yaml")
	os.WriteFile(other, []byte(strings.ReplaceAll(otherFleet, "%IMAGE%", img)), 0o644)
	t.Cleanup(func() { v.run("fleet", "down", "-f", other) })
	if out, stderr, code := v.run("fleet", "up", "-f", other); code != 0 {
		t.Fatalf("fleet up (second fleet): exit %d\n%s%s", code, out, stderr)
	}
	if ps, _, _ := v.run("fleet", "ps", "-f", other); !regexpMatch(`(?m)^redis\s+devg-redis\s+running\s+healthy\s+10\.78\.0\.\d+`, ps) {
		t.Errorf("fleet ps (second fleet, subnet 10.78.0.0/24):\n%s", ps)
	}
	if out, stderr, code := v.run("fleet", "logs", "--file", other, "redis"); code != 0 || !regexpMatch(`(?m)^redis \| entrypoint env: the second fleet's`, out) {
		t.Errorf("fleet logs (second fleet): exit %d, stderr %q, stdout:\n%s", code, stderr, out)
	}
	if out, stderr, code := v.run("fleet", "exec", "-f", other, "redis", "--", "sh", "-c", "getent hosts redis.lan; redis-cli -h redis.lan set owner devg; redis-cli -h redis.lan get greeting"); code != 0 ||
		!regexpMatch(`^10\.78\.0\.\d+\s+redis\.lan`, out) || !strings.Contains(out, "OK") || strings.Contains(out, "kept-on-the-volume") {
		t.Errorf("second fleet's redis.lan: exit %d, stderr %q, stdout:\n%s", code, stderr, out)
	}
	if out := mustBuilder("redis.lan", "sh", "-c", "getent hosts redis.lan; redis-cli -h redis.lan get owner"); !regexpMatch(`^10\.77\.0\.\d+\s+redis\.lan`, out) || strings.Contains(out, "devg") {
		t.Errorf("first fleet's redis.lan from its builder:\n%s", out)
	}
	// A third fleet whose subnet overlaps the second's is refused before anything boots.
	third := filepath.Join(dir, "third.yaml")
	os.WriteFile(third, []byte(strings.NewReplacer("%IMAGE%", img, "devg", "devh", "10.78.0.0/24", "10.78.0.0/16").Replace(otherFleet)), 0o644)
	if _, stderr, code := v.run("fleet", "up", "-f", third); code == 0 || !strings.Contains(stderr, "subnet 10.78.0.0/16 overlaps subnet 10.78.0.0/24 of fleet devg") {
		t.Errorf("overlapping subnet: exit %d, stderr %q", code, stderr)
	}
	if out, stderr, code := v.run("fleet", "down", "-f", other); code != 0 {
		t.Fatalf("fleet down (second fleet): exit %d\n%s%s", code, out, stderr)
	}

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
		if regexpMatch(`(?m)^builder\s+devf-builder\s+running`, ps) {
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

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

// redisPing sends PING over the redis protocol and returns the first reply line.
func redisPing(t *testing.T, addr string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err.Error()
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err.Error()
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err.Error()
	}
	return strings.TrimSpace(line)
}
