// Package ext4bench measures imaging/ext4 against mke2fs -d and hcsshim's tar2ext4: Go
// benchmarks here (throughput, heap) and run.sh for the side-by-side comparison with ratios.
package ext4bench
