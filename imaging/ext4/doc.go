// Package ext4 writes ext4 filesystem images from a tar stream or a directory, as an ordinary user:
// no mke2fs, no loop device, no root.
//
// The writer streams: file data goes straight into the image at increasing block addresses as it
// is read (all-zero blocks become holes, so the output is sparse), while the metadata (inodes,
// directories, extent trees, extended attributes) is kept in memory and laid out once the input
// ends. Memory is therefore bounded by the number of entries and extents, never by data size.
//
// The image uses 4 KiB blocks, 256-byte inodes, extents, flex_bg placement of bitmaps and inode
// tables (after the data), htree-indexed directories, 64-bit group descriptors, huge_file,
// dir_nlink, extra_isize, metadata_csum (crc32c) and, unless disabled, an internal JBD2 journal.
// Its UUID and htree hash seed derive from a SHA-256 over FormatVersion, the options and a
// content hash of the input bytes (SHA-256 over 256 KiB leaves, hashed on all cores, then over
// the leaf digests), and nothing else in the image depends on the clock or the host, so identical
// input and options give a byte-identical image. An explicit UUID (a caller that names the image
// itself, like the OCI converter) skips the content hash.
//
// Why not a library: go-diskfs builds ext4 through a random-access filesystem API over a
// device (create, seek, write) rather than streaming a tar in one pass into a layout decided at
// the end; hcsshim's compactext4 (v0.15.0) streams, but writes no metadata checksums, no htree
// (linear directories make lookups in a 100,000-entry directory slow in the guest) and no
// journal, and has no content-derived identity. Writing the format here keeps the streaming
// layout, checksums and determinism under our control; e2fsck -fn and the kernel in the tests are
// the arbiters of correctness.
//
// Concurrency: WriteTar, WriteDir, WriteEmpty, Fingerprint and Writers may run concurrently on
// different outputs; each owns its output file until it returns (a Writer until Close or Abort).
// Internally one call reads its input ahead on one goroutine, which ends before the call returns,
// and hashes it on up to GOMAXPROCS short-lived others, which end by themselves once their leaf is
// hashed (on an error return they may outlive the call by that much).
package ext4
