package ext4

import (
	"errors"
	"math/bits"
	"sort"
)

const (
	blockSize      = 4096
	blocksPerGroup = 32768
	inodeSize      = 256
	descSize       = 64
	maxExtentLen   = 32768
	// autoGDTBlocks is the descriptor room kept after each superblock copy when the image size is
	// not known up front: 256 blocks describe 16384 groups, a 2 TiB image. Unused room is free
	// space (and a hole in the file).
	autoGDTBlocks = 256
)

// ErrNoSpace means the content does not fit in the requested image size.
var ErrNoSpace = errors.New("image too small for the content")

// run is a span of blocks.
type run struct{ start, len uint64 }

// hasSuper reports whether group g holds a superblock copy (sparse_super: 0, 1 and powers of
// 3, 5 and 7).
func hasSuper(g uint64) bool {
	if g <= 1 {
		return true
	}
	for _, b := range []uint64{3, 5, 7} {
		n := b
		for n < g {
			n *= b
		}
		if n == g {
			return true
		}
	}
	return false
}

// allocator hands out blocks from a cursor that only moves forward, stepping over the superblock
// and descriptor copies at the start of backup groups. Everything below the cursor is in use
// except the runs in freed and the unused descriptor room.
type allocator struct {
	next   uint64 // first block never handed out
	limit  uint64 // image blocks, 0 while the size is open
	gdtRes uint64 // descriptor blocks reserved after each superblock copy
	freed  []run
}

func (a *allocator) clone() *allocator {
	c := *a
	c.freed = append([]run(nil), a.freed...)
	return &c
}

// header is the number of blocks at the start of group g that belong to the superblock copy.
func (a *allocator) header(g uint64) uint64 {
	if hasSuper(g) {
		return 1 + a.gdtRes
	}
	return 0
}

// take hands out up to n contiguous blocks (at least one).
func (a *allocator) take(n uint64) (uint64, uint64, error) {
	g := a.next / blocksPerGroup
	if h := a.header(g); a.next < g*blocksPerGroup+h {
		a.next = g*blocksPerGroup + h
	}
	end := (g + 1) * blocksPerGroup
	if a.limit != 0 && end > a.limit {
		end = a.limit
	}
	if a.limit == 0 && g >= a.gdtRes*blockSize/descSize {
		return 0, 0, errors.New("image would exceed the automatic size limit; give --size")
	}
	if a.next >= end {
		return 0, 0, ErrNoSpace
	}
	got := min(n, end-a.next)
	start := a.next
	a.next += got
	return start, got, nil
}

// takeContig hands out exactly n contiguous blocks (n <= a group's free room), leaving any
// skipped blocks free.
func (a *allocator) takeContig(n uint64) (uint64, error) {
	for {
		before := a.next
		start, got, err := a.take(n)
		if err != nil {
			return 0, err
		}
		if got == n {
			return start, nil
		}
		a.freed = append(a.freed, run{start, got})
		if a.next == before {
			return 0, ErrNoSpace
		}
	}
}

func (a *allocator) free(r run) { a.freed = append(a.freed, r) }

// usedBitmap fills bm (one block-group bitmap) for group g of an image of blocks blocks with
// gdtBlocks live descriptor blocks, and returns the number of used blocks in the group. freed
// must be sorted; fi is the caller's cursor into it.
func (a *allocator) usedBitmap(bm []byte, g, blocks, gdtBlocks uint64, fi *int) uint64 {
	clear(bm)
	gs := g * blocksPerGroup
	ge := min(gs+blocksPerGroup, blocks)
	// Bit ranges relative to the group start.
	set := func(from, to uint64) { setBits(bm, from-gs, to-gs, true) }
	unset := func(from, to uint64) {
		from, to = max(from, gs), min(to, ge)
		if from < to {
			setBits(bm, from-gs, to-gs, false)
		}
	}
	if a.next > gs {
		set(gs, min(ge, a.next))
	}
	if h := a.header(g); h > 0 {
		set(gs, gs+1+gdtBlocks)
		unset(gs+1+gdtBlocks, gs+h)
	}
	for *fi < len(a.freed) && a.freed[*fi].start+a.freed[*fi].len <= gs {
		*fi++
	}
	for i := *fi; i < len(a.freed) && a.freed[i].start < ge; i++ {
		unset(a.freed[i].start, a.freed[i].start+a.freed[i].len)
	}
	var used uint64
	for _, b := range bm[:(ge-gs)/8] {
		used += uint64(bits.OnesCount8(b))
	}
	for b := (ge - gs) &^ 7; b < ge-gs; b++ {
		if bm[b/8]&(1<<(b%8)) != 0 {
			used++
		}
	}
	// Blocks past the end of the image are marked in use.
	setBits(bm, ge-gs, blocksPerGroup, true)
	return used
}

// setBits sets or clears bits [from, to) of bm.
func setBits(bm []byte, from, to uint64, on bool) {
	for from < to && from%8 != 0 {
		setBit(bm, from, on)
		from++
	}
	for ; from+8 <= to; from += 8 {
		if on {
			bm[from/8] = 0xff
		} else {
			bm[from/8] = 0
		}
	}
	for ; from < to; from++ {
		setBit(bm, from, on)
	}
}

func setBit(bm []byte, i uint64, on bool) {
	if on {
		bm[i/8] |= 1 << (i % 8)
	} else {
		bm[i/8] &^= 1 << (i % 8)
	}
}

func (a *allocator) sortFreed() {
	sort.Slice(a.freed, func(i, j int) bool { return a.freed[i].start < a.freed[j].start })
}
