package ext4_test

import (
	"archive/tar"
	"context"
	"encoding/binary"
	"io"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

// TestMemoryBoundedByMetadata streams 3 GiB of file data through WriteTar and samples the heap:
// it must stay flat, far below the data size.
func TestMemoryBoundedByMetadata(t *testing.T) {
	cmdtest.Heavy(t)
	const files, size = 3, 1 << 30
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		block := make([]byte, 1<<20)
		for i := range block {
			block[i] = byte(i*13 + 1)
		}
		var c uint64
		for i := 0; i < files; i++ {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "f" + string(rune('a'+i)), Size: size, Mode: 0o644}); err != nil {
				pw.CloseWithError(err)
				return
			}
			for left := size; left > 0; left -= len(block) {
				c++
				binary.LittleEndian.PutUint64(block, c)
				if _, err := tw.Write(block); err != nil {
					pw.CloseWithError(err)
					return
				}
			}
		}
		pw.CloseWithError(tw.Close())
	}()
	runtime.GC()
	var peak uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	img := filepath.Join(t.TempDir(), "mem.ext4")
	_, err := ext4.WriteTar(context.Background(), pr, img, ext4.Options{NoJournal: true})
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	ext4test.Fsck(t, img)
	t.Logf("peak heap in use: %.1f MiB for %d GiB of data", float64(peak)/(1<<20), files*size>>30)
	if peak > 32<<20 {
		t.Fatalf("peak heap %.1f MiB: memory grows with data", float64(peak)/(1<<20))
	}
}
