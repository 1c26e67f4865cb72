package flock

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"
)

// TestLock: a second taker waits until the first lets go (flock's open file descriptions conflict
// within one process as across processes), a wait ends with its context, other paths are
// independent, and a path that cannot be created is an error.
func TestLock(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "x.lock")
	ctx := context.Background()
	unlock, err := Lock(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan func(), 1)
	go func() {
		u, err := Lock(ctx, p)
		if err != nil {
			t.Error(err)
			u = func() {}
		}
		got <- u
	}()
	select {
	case <-got:
		t.Fatal("a second Lock took the file while the first held it")
	case <-time.After(200 * time.Millisecond):
	}
	other, err := Lock(ctx, filepath.Join(dir, "y.lock"))
	if err != nil {
		t.Fatal(err)
	}
	other()
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := Lock(short, p); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a wait past its context: %v, want DeadlineExceeded", err)
	}
	unlock()
	select {
	case u := <-got:
		u()
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting Lock never got the file")
	}
	if _, err := Lock(ctx, filepath.Join(dir, "missing", "z.lock")); err == nil {
		t.Fatal("Lock in a missing folder: no error")
	}
}
