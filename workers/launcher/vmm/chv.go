package vmm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// CloudHypervisor drives cloud-hypervisor (>= v40) through its REST API on a unix socket:
// spawn with --api-socket, vm.create with the whole VmConfig, vm.boot; power-button, vm.shutdown and
// vmm.shutdown to stop. Request bodies follow CH's OpenAPI spec (checked in the tests against
// ../shared/cloud-hypervisor/cloud-hypervisor.yaml).
type CloudHypervisor struct {
	Binary string
}

// NewCloudHypervisor finds the cloud-hypervisor binary (path "" searches $PATH).
func NewCloudHypervisor(path string) (*CloudHypervisor, error) {
	if path == "" {
		path = "cloud-hypervisor"
	}
	p, err := exec.LookPath(path)
	if err != nil {
		return nil, fmt.Errorf("vmm: cloud-hypervisor: %w", err)
	}
	return &CloudHypervisor{Binary: p}, nil
}

// Name implements Driver.
func (c *CloudHypervisor) Name() string { return "cloud-hypervisor" }

func (c *CloudHypervisor) apiSocket(s Spec) string { return filepath.Join(s.Dir, "ch-api.sock") }

// The VmConfig subset virtkit sends; field names are CH's.
type (
	chVMConfig struct {
		CPUs    chCPUs    `json:"cpus"`
		Memory  chMemory  `json:"memory"`
		Payload chPayload `json:"payload"`
		Disks   []chDisk  `json:"disks,omitempty"`
		FS      []chFS    `json:"fs,omitempty"`
		Vsock   *chVsock  `json:"vsock,omitempty"`
		Net     []chNet   `json:"net,omitempty"`
		Serial  chConsole `json:"serial"`
		Console chConsole `json:"console"`
		RNG     chRNG     `json:"rng"`
	}
	chCPUs struct {
		BootVCPUs int `json:"boot_vcpus"`
		MaxVCPUs  int `json:"max_vcpus"`
	}
	chMemory struct {
		Size   int64 `json:"size"`
		Shared bool  `json:"shared"`
	}
	chPayload struct {
		Kernel    string `json:"kernel"`
		Cmdline   string `json:"cmdline,omitempty"`
		Initramfs string `json:"initramfs,omitempty"`
	}
	chDisk struct {
		Path      string `json:"path"`
		ReadOnly  bool   `json:"readonly"`
		ImageType string `json:"image_type"`
		ID        string `json:"id"`
	}
	chFS struct {
		Tag       string `json:"tag"`
		Socket    string `json:"socket"`
		NumQueues int    `json:"num_queues"`
		QueueSize int    `json:"queue_size"`
		ID        string `json:"id"`
	}
	chVsock struct {
		CID    int64  `json:"cid"`
		Socket string `json:"socket"`
		ID     string `json:"id"`
	}
	chNet struct {
		Tap string `json:"tap"`
		MAC string `json:"mac"`
		ID  string `json:"id"`
	}
	chConsole struct {
		Mode string `json:"mode"`
		File string `json:"file,omitempty"`
	}
	chRNG struct {
		Src string `json:"src"`
	}
)

// VMConfig returns the vm.create body for spec (exported for tests and dry runs).
func (c *CloudHypervisor) VMConfig(s Spec) ([]byte, error) {
	cmdline := "console=ttyS0 reboot=k panic=-1"
	if s.Cmdline != "" {
		cmdline += " " + s.Cmdline
	}
	cfg := chVMConfig{
		CPUs:    chCPUs{BootVCPUs: s.CPUs, MaxVCPUs: s.CPUs},
		Memory:  chMemory{Size: int64(s.MemoryMiB) << 20, Shared: true},
		Payload: chPayload{Kernel: s.Kernel, Cmdline: cmdline, Initramfs: s.Initramfs},
		Serial:  chConsole{Mode: "File", File: s.ConsoleLog()},
		Console: chConsole{Mode: "Off"},
		RNG:     chRNG{Src: "/dev/urandom"},
	}
	for i, d := range s.Disks {
		cfg.Disks = append(cfg.Disks, chDisk{Path: d.Path, ReadOnly: d.ReadOnly, ImageType: "Raw", ID: fmt.Sprintf("disk%d", i)})
	}
	for i, sh := range s.Shares {
		cfg.FS = append(cfg.FS, chFS{Tag: sh.Tag, Socket: sh.Socket, NumQueues: 1, QueueSize: 1024, ID: fmt.Sprintf("fs%d", i)})
	}
	for i, n := range s.NICs {
		cfg.Net = append(cfg.Net, chNet{Tap: n.Tap, MAC: n.MAC, ID: fmt.Sprintf("net%d", i)})
	}
	if s.VsockCID != 0 {
		cfg.Vsock = &chVsock{CID: int64(s.VsockCID), Socket: s.VsockSocket(), ID: "vsock0"}
	}
	return json.Marshal(cfg)
}

// Start implements Driver.
func (c *CloudHypervisor) Start(ctx context.Context, s Spec) (Machine, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("vmm: cloud-hypervisor: %w", err)
	}
	body, err := c.VMConfig(s)
	if err != nil {
		return nil, err
	}
	log, err := os.OpenFile(s.VMMLog(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("vmm: cloud-hypervisor: %w", err)
	}
	defer log.Close()
	api := c.apiSocket(s)
	os.Remove(api)
	os.Remove(s.VsockSocket())
	cmd := exec.Command(c.Binary, "--api-socket", "path="+api)
	cmd.Stdout, cmd.Stderr = log, log
	fmt.Fprintf(log, "%s %s --api-socket path=%s\nvm.create %s\n", time.Now().Format(time.RFC3339Nano), c.Binary, api, body)
	if err := startChild(cmd); err != nil {
		return nil, fmt.Errorf("vmm: start cloud-hypervisor: %w", err)
	}
	m := newProcMachine(cmd, s)
	cl := chClient(api)
	fail := func(err error) (Machine, error) {
		m.Kill()
		return nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := WaitSocket(sctx, api, m.done); err != nil {
		return fail(fmt.Errorf("vmm: cloud-hypervisor api socket: %w: %s", err, tailFile(s.VMMLog(), 1024)))
	}
	if err := chCall(ctx, cl, http.MethodPut, "vm.create", body, nil); err != nil {
		return fail(err)
	}
	if err := chCall(ctx, cl, http.MethodPut, "vm.boot", nil, nil); err != nil {
		return fail(err)
	}
	m.shutdown = func(ctx context.Context) error { return chCall(ctx, cl, http.MethodPut, "vm.power-button", nil, nil) }
	m.quit = func(ctx context.Context) error {
		chCall(ctx, cl, http.MethodPut, "vm.shutdown", nil, nil)
		return chCall(ctx, cl, http.MethodPut, "vmm.shutdown", nil, nil)
	}
	return m, nil
}

// Info returns vm.info's state (Created, Running, Shutdown, Paused).
func (c *CloudHypervisor) Info(ctx context.Context, s Spec) (string, error) {
	var info struct {
		State string `json:"state"`
	}
	if err := chCall(ctx, chClient(c.apiSocket(s)), http.MethodGet, "vm.info", nil, &info); err != nil {
		return "", err
	}
	return info.State, nil
}

func chClient(socket string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}}
}

// chCall performs one API request; 2xx is success, anything else an error with CH's message.
func chCall(ctx context.Context, cl *http.Client, method, endpoint string, body []byte, out any) error {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost/api/v1/"+endpoint, r)
	if err != nil {
		return fmt.Errorf("cloud-hypervisor %s: %w", endpoint, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := cl.Do(req)
	if err != nil {
		return fmt.Errorf("cloud-hypervisor %s: %w", endpoint, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("cloud-hypervisor %s: %s: %s", endpoint, resp.Status, strings.TrimSpace(string(b)))
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("cloud-hypervisor %s: decode: %w", endpoint, err)
		}
	}
	return nil
}
