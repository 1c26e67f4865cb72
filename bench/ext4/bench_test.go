package ext4bench

import (
	"archive/tar"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

// genTar streams a tar of files×size bytes of non-zero data without holding it in memory.
func genTar(files int, size int64, nameFmt string) (io.Reader, int64) {
	pr, pw := io.Pipe()
	cw := &countWriter{w: pw}
	go func() {
		tw := tar.NewWriter(cw)
		block := make([]byte, 1<<20)
		for i := range block {
			block[i] = byte(i*7 + 1)
		}
		var c uint64
		for i := 0; i < files; i++ {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf(nameFmt, i, i%101, i), Size: size, Mode: 0o644, ModTime: time.Unix(1700000000, 0)}); err != nil {
				pw.CloseWithError(err)
				return
			}
			for left := size; left > 0; {
				n := min(left, int64(len(block)))
				c++
				binary.LittleEndian.PutUint64(block, c)
				if _, err := tw.Write(block[:n]); err != nil {
					pw.CloseWithError(err)
					return
				}
				left -= n
			}
		}
		pw.CloseWithError(tw.Close())
	}()
	return pr, files64(files) * size
}

func files64(n int) int64 { return int64(n) }

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func benchWrite(b *testing.B, files int, size int64, nameFmt string) {
	dir := b.TempDir()
	b.SetBytes(int64(files) * size)
	var peak uint64
	for i := 0; i < b.N; i++ {
		r, _ := genTar(files, size, nameFmt)
		out := filepath.Join(dir, "out.ext4")
		if _, err := ext4.WriteTar(context.Background(), r, out, ext4.Options{}); err != nil {
			b.Fatal(err)
		}
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		peak = max(peak, ms.HeapSys)
		os.Remove(out)
	}
	b.ReportMetric(float64(peak)/(1<<20), "heap-MiB")
}

// BenchmarkLargeFiles: four 256 MiB files.
func BenchmarkLargeFiles(b *testing.B) { benchWrite(b, 4, 256<<20, "data/%d-%d-%d") }

// BenchmarkSmallFiles: 30,000 files of 6 KiB in 101 directories.
func BenchmarkSmallFiles(b *testing.B) { benchWrite(b, 30000, 6<<10, "d%[2]d/f%[1]d-%[3]d") }

// BenchmarkDebianRootfs converts the cached debootstrap tar.
func BenchmarkDebianRootfs(b *testing.B) {
	tarball := ext4test.DebianTar(b)
	st, err := os.Stat(tarball)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(st.Size())
	dir := b.TempDir()
	for i := 0; i < b.N; i++ {
		f, err := os.Open(tarball)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ext4.WriteTar(context.Background(), f, filepath.Join(dir, "out.ext4"), ext4.Options{}); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}
