package vmm

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// When the test binary runs as VK_FAKE_CH=1 it plays a cloud-hypervisor process: it serves the REST
// API on --api-socket with the response shapes CH gives (204 on PUT actions, JSON for ping/info),
// validates every body against CH's OpenAPI spec, and logs the exchange for the test to compare.
func TestMain(m *testing.M) {
	if os.Getenv("VK_FAKE_CH") == "1" {
		os.Exit(fakeCH(os.Args[1:]))
	}
	os.Exit(m.Run())
}

type exchange struct {
	Method, Endpoint string
	Status           int
	Problems         []string `json:",omitempty"`
}

func fakeCH(args []string) int {
	if len(args) != 2 || args[0] != "--api-socket" || !strings.HasPrefix(args[1], "path=") {
		fmt.Fprintln(os.Stderr, "fake ch: bad args", args)
		return 2
	}
	o := &openAPI{}
	b, _ := os.ReadFile(os.Getenv("VK_FAKE_CH_SPEC"))
	if err := yamlUnmarshal(b, &o.doc); err != nil {
		fmt.Fprintln(os.Stderr, "fake ch: spec:", err)
		return 2
	}
	logf, _ := os.OpenFile(os.Getenv("VK_FAKE_CH_LOG"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	l, err := net.Listen("unix", strings.TrimPrefix(args[1], "path="))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake ch:", err)
		return 1
	}
	state := "NotCreated"
	exit := make(chan struct{})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ep := strings.TrimPrefix(r.URL.Path, "/api/v1/")
		body, _ := io.ReadAll(r.Body)
		ex := exchange{Method: r.Method, Endpoint: ep, Problems: o.validateBody(ep, body)}
		switch {
		case ep == "vmm.ping" && r.Method == http.MethodGet:
			ex.Status = 200
		case ep == "vm.info" && r.Method == http.MethodGet:
			ex.Status = 200
			if state == "NotCreated" {
				ex.Status = 404
			}
		case r.Method != http.MethodPut:
			ex.Status = 405
		case ep == "vm.create":
			ex.Status, state = 204, "Created"
		case ep == "vm.boot":
			ex.Status, state = 204, "Running"
		case ep == "vm.power-button":
			ex.Status = 204 // our fake guest ignores the button, as a guest without ACPI handling would
		case ep == "vm.shutdown":
			ex.Status, state = 204, "Shutdown"
		case ep == "vmm.shutdown":
			ex.Status = 204
			defer close(exit)
		default:
			ex.Status = 404
		}
		if len(ex.Problems) > 0 {
			ex.Status = 400
		}
		line, _ := json.Marshal(ex)
		logf.Write(append(line, '\n'))
		switch ex.Status {
		case 200:
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(200)
			if ep == "vmm.ping" {
				io.WriteString(w, `{"build_version":"v53.0","version":"53.0","pid":1}`)
			} else {
				fmt.Fprintf(w, `{"config":{"payload":{}},"state":%q}`, state)
			}
		default:
			w.WriteHeader(ex.Status)
		}
	})}
	go srv.Serve(l)
	<-exit
	time.Sleep(10 * time.Millisecond)
	return 0
}

func TestCloudHypervisorExchange(t *testing.T) {
	o := loadOpenAPI(t)
	_ = o
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	disk := filepath.Join(dir, "rootfs.ext4")
	for _, f := range []string{kernel, disk} {
		os.WriteFile(f, []byte("x"), 0o600)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "exchange.log")
	t.Setenv("VK_FAKE_CH", "1")
	t.Setenv("VK_FAKE_CH_LOG", logPath)
	t.Setenv("VK_FAKE_CH_SPEC", specPath(t))
	ch := &CloudHypervisor{Binary: self}
	spec := Spec{
		Name: "t", Dir: filepath.Join(dir, "vm"), Kernel: kernel, Cmdline: "root=/dev/vda ro",
		CPUs: 2, MemoryMiB: 512, VsockCID: 3,
		Disks:  []Disk{{Path: disk, ReadOnly: true}},
		Shares: []Share{{Tag: "share0", Socket: filepath.Join(dir, "fs.sock")}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	m, err := ch.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	if st, err := ch.Info(ctx, spec); err != nil || st != "Running" {
		t.Fatalf("vm.info = %q, %v; want Running", st, err)
	}
	sctx, scancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer scancel()
	if err := m.Shutdown(sctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(); err != nil {
		t.Fatalf("fake CH exit: %v", err)
	}
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	var got []exchange
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var ex exchange
		if err := json.Unmarshal([]byte(line), &ex); err != nil {
			t.Fatalf("exchange log line %q: %v", line, err)
		}
		got = append(got, ex)
	}
	want := []exchange{
		{"PUT", "vm.create", 204, nil},
		{"PUT", "vm.boot", 204, nil},
		{"GET", "vm.info", 200, nil},
		{"PUT", "vm.power-button", 204, nil},
		{"PUT", "vm.shutdown", 204, nil},
		{"PUT", "vmm.shutdown", 204, nil},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("HTTP exchange with Cloud Hypervisor (-want +got):\n%s", d)
	}
}

// TestCloudHypervisorBodiesMatchSpec validates vm.create bodies for a spread of specs.
func TestCloudHypervisorBodiesMatchSpec(t *testing.T) {
	o := loadOpenAPI(t)
	ch := &CloudHypervisor{}
	for _, s := range []Spec{
		{Name: "min", Dir: "/run/vk/min", Kernel: "/k", CPUs: 1, MemoryMiB: 128},
		{Name: "full", Dir: "/run/vk/full", Kernel: "/k", Initramfs: "/i", Cmdline: "root=/dev/vda", CPUs: 8, MemoryMiB: 16384, VsockCID: 1234,
			Disks:  []Disk{{Path: "/a", ReadOnly: true}, {Path: "/b"}},
			Shares: []Share{{Tag: "a", Socket: "/s1"}, {Tag: "b", Socket: "/s2"}},
			NICs:   []NIC{{Tap: "vkpool0", MAC: "52:54:00:12:34:56"}}},
	} {
		body, err := ch.VMConfig(s)
		if err != nil {
			t.Fatal(err)
		}
		if errs := o.validateBody("vm.create", body); len(errs) > 0 {
			t.Errorf("%s: vm.create body does not match CH's spec:\n%s\n%s", s.Name, strings.Join(errs, "\n"), body)
		}
	}
}

func specPath(t *testing.T) string {
	p, _ := filepath.Abs(filepath.Join(cmdtestRoot(t), "..", "shared", "cloud-hypervisor", "cloud-hypervisor.yaml"))
	return p
}
