package store_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/virtkit/virtkit/imaging/store"
)

const fp1 = "0123456789abcdef0123456789abcdef"

func TestBuildOnce(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var runs atomic.Int32
	build := func(ctx context.Context, dir string) (*store.ImageConfig, error) {
		runs.Add(1)
		time.Sleep(50 * time.Millisecond)
		return &store.ImageConfig{Source: "x", Cmd: []string{"sh"}}, os.WriteFile(filepath.Join(dir, "rootfs.ext4"), []byte("fs"), 0o644)
	}
	var wg sync.WaitGroup
	for range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, _, err := st.Build(context.Background(), fp1, build)
			if err != nil || b.Image.Cmd[0] != "sh" || b.Size != 2 {
				t.Errorf("build: %+v %v", b, err)
			}
		}()
	}
	wg.Wait()
	if runs.Load() != 1 {
		t.Errorf("built %d times", runs.Load())
	}
	// A failing build leaves nothing; the next one runs.
	boom := errors.New("boom")
	_, _, err = st.Build(context.Background(), "ffff"+fp1, func(ctx context.Context, dir string) (*store.ImageConfig, error) {
		os.WriteFile(filepath.Join(dir, "rootfs.ext4"), []byte("half"), 0o644)
		return nil, boom
	})
	if !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if _, err := st.Get("ffff" + fp1); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("failed build visible: %v", err)
	}
	if _, _, err := st.Build(context.Background(), "../../etc", build); err == nil {
		t.Error("a path as a fingerprint was accepted")
	}
}

func FuzzParseImageConfig(f *testing.F) {
	c := &store.ImageConfig{Entrypoint: []string{"/bin/sh"}, Env: []string{"A=b"}, ExposedPorts: []string{"80/tcp"}, Labels: map[string]string{"a": "b"}, Source: "x"}
	b, _ := store.MarshalImageConfig(c)
	f.Add(b)
	f.Add([]byte(`{"cmd":"notalist"}`))
	f.Add([]byte(`{} {}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := store.ParseImageConfig(data)
		if err != nil {
			return
		}
		out, err := store.MarshalImageConfig(c)
		if err != nil {
			t.Fatal(err)
		}
		back, err := store.ParseImageConfig(out)
		if err != nil || !strings.EqualFold(string(mustMarshal(t, back)), string(out)) {
			t.Fatalf("round trip: %v\n%s", err, out)
		}
	})
}

func mustMarshal(t *testing.T, c *store.ImageConfig) []byte {
	b, err := store.MarshalImageConfig(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
