package gitlab_test

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/imagetest"
)

// serviceImage writes an OCI layout at dir/pingsvc: busybox alone, whose entrypoint serves TCP
// port 6379 (exposed in the image config), answering each connection with a line made of its
// environment's GREETING and its arguments.
func serviceImage(t *testing.T, dir string) string {
	t.Helper()
	bb, err := os.ReadFile(cmdtest.Tool(t, "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	files := []imagetest.File{
		imagetest.Dir("bin/"), imagetest.Dir("sbin/"), imagetest.Dir("etc/"), imagetest.Dir("proc/"), imagetest.Dir("sys/"),
		imagetest.Dir("dev/"), imagetest.Dir("tmp/"), imagetest.Dir("run/"), imagetest.Dir("root/"),
		{Name: "bin/busybox", Body: string(bb), Mode: 0o755},
		imagetest.Symlink("bin/sh", "busybox"),
		{Name: "etc/passwd", Body: "root:x:0:0:root:/root:/bin/sh\n", Mode: 0o644},
		{Name: "etc/group", Body: "root:x:0:\n", Mode: 0o644},
		{Name: "serve.sh", Body: "#!/bin/sh\nexec /bin/busybox nc -ll -p 6379 -e /bin/busybox echo \"svc $GREETING $*\"\n", Mode: 0o755},
	}
	img, err := mutate.AppendLayers(empty.Image, imagetest.Layer(t, imagetest.Tar(t, files...)))
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.Config(img, v1.Config{Entrypoint: []string{"/bin/sh", "/serve.sh"}, Cmd: []string{"from-image-cmd"},
		Env: []string{"PATH=/bin", "GREETING=image-greeting"}, ExposedPorts: map[string]struct{}{"6379/tcp": {}}})
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "pingsvc")
	lp, err := layout.Write(p, empty.Index)
	if err == nil {
		err = lp.AppendImage(img)
	}
	if err != nil {
		t.Fatal(err)
	}
	return "oci:" + p
}

// TestServicesOnMicroVMs: a job's GitLab services boot as sibling microVMs on its LAN, take slots
// of the host's capacity, answer under their aliases (the explicit one and the one derived from
// the image name) with the job response's command and variables, stay invisible to another job
// on the same host, and are gone after cleanup.
func TestServicesOnMicroVMs(t *testing.T) {
	f := newFixture(t)
	svcDir := filepath.Join(t.TempDir(), "svc")
	if err := os.MkdirAll(svcDir, 0o755); err != nil {
		t.Fatal(err)
	}
	svcImage := serviceImage(t, svcDir)
	h := f.hosts["vk-a"]
	cfg, err := os.ReadFile(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Three slots: the job and its service, and the other job.
	s := strings.Replace(string(cfg), "capacity = 2", "capacity = 3", 1)
	s = strings.Replace(s, fmt.Sprintf("allowed_registries = [\"tar:%s\"]", f.imgDir), fmt.Sprintf("allowed_registries = [\"tar:%s\", \"oci:%s\"]", f.imgDir, svcDir), 1)
	writeFile(t, h.cfg, s)
	a := f.start("vk-a")

	services := []map[string]any{{
		"name": svcImage, "alias": "cache-db", "command": []string{"extra-arg"},
		"variables": []map[string]any{{"key": "GREETING", "value": "hello-from-variables"}},
	}}
	j := f.jobWith(400, nil, services)
	check(t, "prepare", j.hook("prepare"), 0, "Running on host vk-a")
	if n := len(a.ciVMs()); n != 2 {
		t.Fatalf("%d CI VMs on the host (%v), want the job's and its service's", n, a.ciVMs())
	}
	// Reachable by the explicit alias and the image's name, through the resolver and by DNS.
	r := j.run("build_script", `for name in cache-db pingsvc cache-db.lan; do
  exec 3<>/dev/tcp/$name/6379
  read -r line <&3
  echo "$name: $line"
  exec 3<&-
done
getent hosts cache-db
`)
	check(t, "reach the service", r, 0, "cache-db: svc hello-from-variables extra-arg", "pingsvc: svc hello-from-variables extra-arg", "cache-db.lan: svc hello-from-variables extra-arg")
	t.Logf("job output:\n%s", r.stdout)
	ip := regexp.MustCompile(`(?m)^(\d+\.\d+\.\d+\.\d+)\s+cache-db`).FindStringSubmatch(r.stdout)
	if ip == nil {
		t.Fatalf("no address for cache-db in:\n%s", r.stdout)
	}

	// Another job on the same host: its LAN has no such names, and the address leads nowhere.
	other := f.job(401, nil)
	check(t, "prepare other", other.hook("prepare"), 0, "Running on host vk-a")
	r = other.run("build_script", fmt.Sprintf(`if getent hosts cache-db; then echo resolved; exit 1; fi
if timeout 5 bash -c 'exec 3<>/dev/tcp/%s/6379 && read -r line <&3 && echo "$line"' 2>/dev/null | grep svc; then echo reached; exit 1; fi
echo isolated
`, ip[1]))
	check(t, "other job cannot see the service", r, 0, "isolated")
	check(t, "cleanup other", other.hook("cleanup"), 0)

	check(t, "cleanup", j.hook("cleanup"), 0)
	waitFor(t, "no CI VM left", 30*time.Second, func() bool { return len(a.ciVMs()) == 0 })
	if p := processesUnder(a.state + "/ci"); len(p) != 0 {
		t.Fatalf("processes left after cleanup: %v", p)
	}
}
