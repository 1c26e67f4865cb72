// Command mkext is the ext4 writer alone, for bench/ext4/run.sh: it measures imaging/ext4
// without the rest of the virtkit binary (same code path as `virtkit mkext-tar` / `mkext`).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime/pprof"

	"github.com/virtkit/virtkit/imaging/ext4"
)

func main() {
	tarPath := flag.String("tar", "", "input tar (plain, gzip or zstd); - for stdin")
	dir := flag.String("dir", "", "input directory")
	out := flag.String("o", "", "output image")
	noJournal := flag.Bool("no-journal", false, "no journal")
	uuid := flag.String("uuid", "", "filesystem UUID (skips the content hash)")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile here")
	flag.Parse()
	if *cpuprofile != "" {
		pf, err := os.Create(*cpuprofile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		pprof.StartCPUProfile(pf)
		defer pprof.StopCPUProfile()
	}
	opts := ext4.Options{NoJournal: *noJournal, UUID: *uuid}
	var res ext4.Result
	var err error
	switch {
	case *dir != "":
		res, err = ext4.WriteDir(context.Background(), *dir, *out, opts)
	case *tarPath == "-":
		res, err = ext4.WriteTar(context.Background(), os.Stdin, *out, opts)
	default:
		var f *os.File
		if f, err = os.Open(*tarPath); err == nil {
			res, err = ext4.WriteTar(context.Background(), f, *out, opts)
			f.Close()
		}
	}
	if err != nil {
		pprof.StopCPUProfile()
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(res.UUID, res.Size)
}
