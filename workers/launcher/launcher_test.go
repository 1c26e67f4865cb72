package launcher

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/cmd/cmdtest"
)

// A start that fails half-way (here: a helper that never listens) leaves nothing behind and does
// not block a later start of the same name.
func TestStartFailureCleansUp(t *testing.T) {
	cmdtest.Tool(t, "qemu-system-x86_64")
	dir := t.TempDir()
	kernel, rootfs := filepath.Join(dir, "vmlinux"), filepath.Join(dir, "rootfs.ext4")
	os.WriteFile(kernel, []byte("k"), 0o600)
	os.WriteFile(rootfs, []byte("r"), 0o600)
	state := filepath.Join(dir, "state")
	l, err := New(Config{StateDir: state, Kernel: kernel, VMM: "qemu", Virtkit: "/bin/false", Logger: zerolog.Nop(),
		NewDisk: func(ctx context.Context, path string, size int64) error { return os.WriteFile(path, nil, 0o600) }})
	if err != nil {
		t.Fatal(err)
	}
	req := Request{Name: "broken", Rootfs: rootfs, Shares: []Share{{HostDir: dir, GuestDir: "/src"}}}
	for i := 0; i < 2; i++ {
		_, err := l.Start(context.Background(), req)
		if err == nil || !strings.Contains(err.Error(), "did not listen") {
			t.Fatalf("start %d: %v, want a helper error", i, err)
		}
		if _, err := os.Stat(l.VMDir("broken")); !os.IsNotExist(err) {
			t.Fatalf("start %d left its folder: %v", i, err)
		}
	}
}

func TestRequestValidation(t *testing.T) {
	dir := t.TempDir()
	rootfs := filepath.Join(dir, "r")
	os.WriteFile(rootfs, nil, 0o600)
	for _, r := range []Request{
		{Name: "Bad_Name", Rootfs: rootfs},
		{Name: "ok", Rootfs: filepath.Join(dir, "missing")},
		{Name: "ok", Rootfs: rootfs, Shares: []Share{{HostDir: dir, GuestDir: "relative"}}},
		{Name: "ok", Rootfs: rootfs, Shares: []Share{{HostDir: dir, GuestDir: "/a,b"}}},
		{Name: "ok", Rootfs: rootfs, Shares: []Share{{HostDir: rootfs, GuestDir: "/f"}}},
		{Name: "ok", Rootfs: rootfs, Host: "Not_A_Label"},
		{Name: "ok", Rootfs: rootfs, Subnet: "10.0.0.0/33"},
	} {
		if err := r.validate(); err == nil {
			t.Errorf("%+v: accepted", r)
		}
	}
}
