// Command gentar writes benchmark tar streams for bench/ext4: "large" (a few big files of
// non-zero, non-repeating data) or "small" (many small files in nested directories).
package main

import (
	"archive/tar"
	"bufio"
	"encoding/binary"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"time"

	"github.com/virtkit/virtkit/imaging/ext4"
)

func main() {
	kind := flag.String("kind", "large", "large or small")
	size := flag.String("size", "1G", "total data size")
	files := flag.Int("files", 4, "number of files")
	flag.Parse()
	total, err := ext4.ParseSize(*size)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	w := bufio.NewWriterSize(os.Stdout, 1<<20)
	tw := tar.NewWriter(w)
	mt := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	rng := rand.New(rand.NewPCG(1, 2))
	block := make([]byte, 1<<20)
	for i := 0; i < len(block); i += 8 {
		binary.LittleEndian.PutUint64(block[i:], rng.Uint64()|1)
	}
	per := total / int64(*files)
	var counter uint64
	for i := 0; i < *files; i++ {
		name := fmt.Sprintf("data/file%05d", i)
		if *kind == "small" {
			name = fmt.Sprintf("d%03d/e%03d/file%06d", i%97, i%1009%113, i)
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Size: per, Mode: 0o644, ModTime: mt}); err != nil {
			panic(err)
		}
		for left := per; left > 0; {
			n := min(left, int64(len(block)))
			counter++
			binary.LittleEndian.PutUint64(block, counter) // every MiB differs
			if _, err := tw.Write(block[:n]); err != nil {
				panic(err)
			}
			left -= n
		}
	}
	if err := tw.Close(); err != nil {
		panic(err)
	}
	if err := w.Flush(); err != nil {
		panic(err)
	}
}
