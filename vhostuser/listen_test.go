package vhostuser

import (
	"net"
	"os"
	"path/filepath"
	"testing"
)

func TestListen(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "s.sock")
	l, err := Listen(p)
	if err != nil {
		t.Fatal(err)
	}
	// Connectable as soon as the path exists; no temporary names left behind.
	c, err := net.Dial("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if es, _ := os.ReadDir(dir); len(es) != 1 {
		t.Fatalf("folder holds %d entries, want only the socket", len(es))
	}
	if _, err := Listen(p); err == nil {
		t.Fatal("second listener on a live socket accepted")
	}
	l.Close()
	// A stale socket is replaced; a regular file is not.
	l2, err := Listen(p)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l2.Close()
	f := filepath.Join(dir, "file")
	os.WriteFile(f, []byte("x"), 0o644)
	if _, err := Listen(f); err == nil {
		t.Fatal("listened over a regular file")
	}
	if b, _ := os.ReadFile(f); string(b) != "x" {
		t.Fatal("regular file damaged")
	}
}
