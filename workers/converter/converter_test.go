package converter_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/broker/brokertest"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/workers/converter"
)

// events collects image events from the log.
type events struct {
	mu  sync.Mutex
	all []broker.Event
}

func (e *events) of(id string) (converting, converted, failed int, last broker.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, ev := range e.all {
		switch v := ev.(type) {
		case *broker.ImageConverting:
			if v.Image == id {
				converting++
			}
		case *broker.ImageConverted:
			if v.Image == id {
				converted++
				last = v
			}
		case *broker.ImageFailed:
			if v.Image == id {
				failed++
				last = v
			}
		}
	}
	return
}

func TestWorker(t *testing.T) {
	_, c := brokertest.Start(t, broker.SchemaOptions{})
	host := imagetest.Registry(t)
	good := host + "/app:1"
	imagetest.Push(t, good, imagetest.Image(t, v1.Config{Cmd: []string{"/app"}},
		imagetest.Tar(t, imagetest.Dir("bin"), imagetest.Reg("bin/app", "app")), imagetest.Tar(t, imagetest.Reg("etc/conf", "c"))))
	bad := host + "/evil:1"
	imagetest.Push(t, bad, imagetest.Image(t, v1.Config{}, imagetest.Tar(t, imagetest.Reg("../../etc/passwd", "x"))))

	dir := t.TempDir()
	w, err := converter.New(converter.Config{Client: c, Convert: oci.ConvertOptions{
		Options: oci.Options{CacheDir: filepath.Join(dir, "cache")},
		Store:   filepath.Join(dir, "images"),
		Agent:   cmdtest.Binary(t, "virtkit-agent"),
	}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("worker run: %v", err)
		}
	})

	var ev events
	sub, err := c.Subscribe(ctx, broker.SubscribeOptions{Filters: []string{broker.EventFilter("image", "", "")}},
		func(_ context.Context, _ *broker.Envelope, e broker.Event) error {
			ev.mu.Lock()
			ev.all = append(ev.all, e)
			ev.mu.Unlock()
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Stop)

	// The same request three times (queued once), and the same image with a pull policy (a
	// different work item, same bundle: converted once on this host).
	var goodID string
	for _, r := range []converter.Request{{Ref: good, Insecure: true}, {Ref: good, Insecure: true}, {Ref: good, Insecure: true}, {Ref: good, Insecure: true, Pull: oci.PullAlways}} {
		if goodID, err = converter.Submit(ctx, c, r); err != nil {
			t.Fatal(err)
		}
	}
	badID, err := converter.Submit(ctx, c, converter.Request{Ref: bad, Insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := converter.Submit(ctx, c, converter.Request{Ref: "http://nope"}); err == nil {
		t.Error("a malformed reference was queued")
	}

	deadline := time.Now().Add(60 * time.Second)
	for {
		_, okN, _, okLast := ev.of(goodID)
		_, _, badN, badLast := ev.of(badID)
		if okN >= 2 && badN >= 1 {
			conv := okLast.(*broker.ImageConverted)
			if conv.Path == "" || conv.FSUUID == "" || conv.SizeBytes == 0 || conv.Digest == "" {
				t.Errorf("converted event %+v", conv)
			}
			if f := badLast.(*broker.ImageFailed); f.Error == "" {
				t.Errorf("failed event %+v", f)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("events after 60s: %d converted, %d failed (%d events)", okN, badN, len(ev.all))
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // let any duplicate show up
	if conv, okN, _, _ := ev.of(goodID); okN != 2 || conv != 2 {
		t.Errorf("good image: %d converting, %d converted events; want 2 and 2 (two distinct work items)", conv, okN)
	}
	if _, _, badN, _ := ev.of(badID); badN != 1 {
		t.Errorf("bad image: %d failed events, want 1 (permanent, not retried)", badN)
	}
}
