package vsock

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/vhostuser/vhostusertest"
)

// qemuArgs are the arguments that attach this backend to a QEMU guest: vhost-user-vsock-device
// on microvm (virtio-mmio), vhost-user-vsock-pci on q35. Guest memory must be a shared memfd.
func qemuArgs(socket, machine string) []string {
	dev := "vhost-user-vsock-device"
	if machine == "q35" {
		dev = "vhost-user-vsock-pci"
	}
	return []string{"-chardev", "socket,id=vsock0,path=" + socket, "-device", dev + ",chardev=vsock0"}
}

// TestQEMUGuest boots a real kernel under QEMU with the backend as its vsock device and moves
// streams both ways through the guest's AF_VSOCK sockets: in-process on microvm, and the
// `virtkit vsockd` command on q35.
func TestQEMUGuest(t *testing.T) {
	t.Run("microvm", func(t *testing.T) { testQEMUGuest(t, "microvm", false) })
	t.Run("q35-cli", func(t *testing.T) { testQEMUGuest(t, "q35", true) })
}

func testQEMUGuest(t *testing.T, machine string, cli bool) {
	initrd := vhostusertest.Initramfs(t, vhostusertest.GuestProg(t))
	dir := t.TempDir()
	cfg := Config{Socket: filepath.Join(dir, "vsock.vhost"), UDS: filepath.Join(dir, "vm.vsock"), CID: 3, Logger: testLogger(t)}
	if cli {
		cmd := exec.Command(cmdtest.Binary(t, "virtkit"), "vsockd", "--socket", cfg.Socket, "--uds", cfg.UDS, "--cid", "3", "--log-level", "warn")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			cmd.Process.Signal(os.Interrupt)
			if err := cmd.Wait(); err != nil {
				t.Errorf("vsockd exit: %v", err)
			}
		}()
		for i := 0; ; i++ {
			_, e1 := os.Stat(cfg.Socket)
			_, e2 := os.Stat(cfg.UDS)
			if e1 == nil && e2 == nil {
				break
			}
			if i > 500 {
				t.Fatal("vsockd did not create its sockets")
			}
			time.Sleep(10 * time.Millisecond)
		}
	} else {
		b, err := Serve(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
	}

	// Guest → host: the guest dials CID 2 port 5000 and echoes.
	hl, err := addr.Listen(fmt.Sprintf("hvsock://%s:%d", cfg.UDS, 5000))
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	g2h := make(chan error, 1)
	go func() {
		c, err := hl.Accept()
		if err != nil {
			g2h <- err
			return
		}
		defer c.Close()
		want := make([]byte, 256<<10)
		rand.Read(want)
		go func() { c.Write(want); c.(*net.UnixConn).CloseWrite() }()
		got, err := io.ReadAll(c)
		if err == nil && !bytes.Equal(got, want) {
			err = fmt.Errorf("guest echoed %d bytes, want %d identical", len(got), len(want))
		}
		g2h <- err
	}()

	vm := vhostusertest.Boot(t, vhostusertest.VMConfig{Initramfs: initrd, InitArgs: []string{"vsock"}, Devices: qemuArgs(cfg.Socket, machine), Machine: machine})
	if err := vm.WaitConsole("GUESTPROG listening", 60*time.Second); err != nil {
		t.Fatal(err)
	}

	// Host → guest: CONNECT 1024, echo 1 MiB.
	t0 := time.Now()
	hc, err := hostDial(t, cfg.UDS, 1024)
	if err != nil {
		t.Fatalf("host → guest dial: %v\n%s", err, vm.Output())
	}
	t.Logf("host → guest connect: %v", time.Since(t0))
	want := make([]byte, 1<<20)
	rand.Read(want)
	t0 = time.Now()
	go func() { hc.Write(want); hc.(*net.UnixConn).CloseWrite() }()
	got, err := io.ReadAll(hc)
	hc.Close()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("host → guest echo: %d bytes, %v", len(got), err)
	}
	t.Logf("host → guest echo of 1 MiB: %v", time.Since(t0))

	// A port nobody listens on in the guest is refused.
	if c, err := hostDial(t, cfg.UDS, 4444); err == nil {
		c.Close()
		t.Fatal("CONNECT to a closed guest port succeeded")
	}

	select {
	case err := <-g2h:
		if err != nil {
			t.Fatalf("guest → host: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("guest never dialed the host\n%s", vm.Output())
	}

	// Ask the guest to power off.
	sc, err := hostDial(t, cfg.UDS, 1099)
	if err != nil {
		t.Fatalf("%v\n%s", err, vm.Output())
	}
	bye := make([]byte, 4)
	if _, err := io.ReadFull(sc, bye); err != nil || string(bye) != "bye\n" {
		t.Fatalf("guest goodbye: %q %v", bye, err)
	}
	sc.Close()
	if err := vm.Wait(60 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := vm.WaitConsole("GUESTPROG PASS", time.Second); err != nil {
		t.Fatal(err)
	}
}
