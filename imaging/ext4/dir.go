package ext4

import (
	"encoding/binary"
	"fmt"
	"sort"
)

const (
	dirTail     = 12                  // checksum tail of a leaf block
	leafRoom    = blockSize - dirTail // bytes for entries in a leaf
	dxRootLimit = (blockSize - 32 - 8) / 8
	dxNodeLimit = (blockSize - 8 - 8) / 8
	flagIndex   = 0x1000 // EXT4_INDEX_FL
	flagExtents = 0x80000
)

type dirent struct {
	name string
	ino  uint32
	ft   uint8
	hash uint32
}

func direntSize(name string) int { return 8 + pad4(len(name)) }

func putDirent(b []byte, ino uint32, recLen int, name string, ft uint8) {
	binary.LittleEndian.PutUint32(b, ino)
	binary.LittleEndian.PutUint16(b[4:], uint16(recLen))
	b[6] = uint8(len(name))
	b[7] = ft
	copy(b[8:], name)
}

// leafTail seals a leaf block with its checksum dirent.
func leafTail(blk []byte, iseed uint32) {
	t := blk[leafRoom:]
	clear(t)
	binary.LittleEndian.PutUint16(t[4:], dirTail)
	t[7] = 0xDE
	binary.LittleEndian.PutUint32(t[8:], crc(iseed, blk[:leafRoom]))
}

// packLeaves fills leaf blocks with entries in order; first holds "." and ".." for a linear
// directory. It returns the blocks and, for each, the index of its first entry.
func packLeaves(ents []dirent, first []dirent) ([][]byte, []int) {
	var blocks [][]byte
	var starts []int
	var cur []byte
	off, last := 0, -1
	flush := func() {
		if cur != nil {
			// the last entry takes the rest of the room
			binary.LittleEndian.PutUint16(cur[last+4:], uint16(leafRoom-last))
			blocks = append(blocks, cur)
		}
	}
	open := func(i int) {
		flush()
		cur = make([]byte, blockSize)
		off, last = 0, -1
		starts = append(starts, i)
	}
	all := append(append([]dirent(nil), first...), ents...)
	for i, e := range all {
		sz := direntSize(e.name)
		if cur == nil || off+sz > leafRoom {
			open(i - len(first))
		}
		putDirent(cur[off:], e.ino, sz, e.name, e.ft)
		last = off
		off += sz
	}
	flush()
	return blocks, starts
}

// dirBlocks lays out a directory: one linear block when it fits, else an htree with a root, up to
// one level of index nodes, and full leaves in hash order. It returns the logical blocks
// (unsealed: checksums need the inode seed, see sealDir) and whether the directory is indexed.
func dirBlocks(self, parent uint32, ents []dirent, seed [4]uint32) ([][]byte, bool, error) {
	dots := []dirent{{name: ".", ino: self, ft: 2}, {name: "..", ino: parent, ft: 2}}
	size := 24
	for _, e := range ents {
		size += direntSize(e.name)
	}
	if size <= leafRoom {
		blocks, _ := packLeaves(ents, dots)
		return blocks, false, nil
	}
	for i := range ents {
		ents[i].hash = dirHash([]byte(ents[i].name), seed)
	}
	sort.Slice(ents, func(i, j int) bool {
		if ents[i].hash != ents[j].hash {
			return ents[i].hash < ents[j].hash
		}
		return ents[i].name < ents[j].name
	})
	leaves, starts := packLeaves(ents, nil)
	// Index entry hash of each leaf: its first hash, with the collision bit when the previous
	// leaf ends with the same hash.
	lh := make([]uint32, len(leaves))
	for i, s := range starts {
		lh[i] = ents[s].hash
		if s > 0 && ents[s-1].hash == ents[s].hash {
			lh[i] |= 1
		}
	}
	nl := len(leaves)
	root := make([]byte, blockSize)
	putDirent(root, self, 12, ".", 2)
	putDirent(root[12:], parent, blockSize-12, "..", 2)
	root[24+4] = 1 // DX_HASH_HALF_MD4 (unsigned via superblock flag)
	root[24+5] = 8 // info length
	blocks := [][]byte{root}
	blocks = append(blocks, leaves...)
	if nl <= dxRootLimit {
		putDX(root[32:], dxRootLimit, lh, 1)
		return blocks, true, nil
	}
	nn := (nl + dxNodeLimit - 1) / dxNodeLimit
	if nn > dxRootLimit {
		return nil, false, fmt.Errorf("directory of %d entries needs more than two htree levels", len(ents))
	}
	root[24+6] = 1 // indirect levels
	nh := make([]uint32, nn)
	for i := 0; i < nn; i++ {
		lo, hi := i*dxNodeLimit, min((i+1)*dxNodeLimit, nl)
		node := make([]byte, blockSize)
		binary.LittleEndian.PutUint16(node[4:], blockSize) // fake empty dirent spanning the block
		putDX(node[8:], dxNodeLimit, lh[lo:hi], uint32(1+lo))
		blocks = append(blocks, node)
		nh[i] = lh[lo]
	}
	putDX(root[32:], dxRootLimit, nh, uint32(1+nl))
	return blocks, true, nil
}

// putDX writes a count/limit header and entries pointing at consecutive logical blocks from
// firstBlk; the first entry's hash is implied (0).
func putDX(b []byte, limit int, hashes []uint32, firstBlk uint32) {
	binary.LittleEndian.PutUint16(b, uint16(limit))
	binary.LittleEndian.PutUint16(b[2:], uint16(len(hashes)))
	binary.LittleEndian.PutUint32(b[4:], firstBlk)
	for i := 1; i < len(hashes); i++ {
		binary.LittleEndian.PutUint32(b[i*8:], hashes[i])
		binary.LittleEndian.PutUint32(b[i*8+4:], firstBlk+uint32(i))
	}
}

// sealDir adds the checksums; indexed directories have their root at block 0 and index nodes
// after the leaves.
func sealDir(blocks [][]byte, indexed bool, iseed uint32) {
	for i, blk := range blocks {
		switch {
		case indexed && i == 0:
			dxTail(blk, 32, iseed)
		case indexed && binary.LittleEndian.Uint32(blk) == 0 && binary.LittleEndian.Uint16(blk[4:]) == blockSize:
			dxTail(blk, 8, iseed)
		default:
			leafTail(blk, iseed)
		}
	}
}

func dxTail(blk []byte, countOff int, iseed uint32) {
	limit := int(binary.LittleEndian.Uint16(blk[countOff:]))
	count := int(binary.LittleEndian.Uint16(blk[countOff+2:]))
	tail := blk[countOff+limit*8:]
	clear(tail[:8])
	c := crc(iseed, blk[:countOff+count*8])
	c = crc(c, tail[:4])
	c = crc(c, []byte{0, 0, 0, 0})
	binary.LittleEndian.PutUint32(tail[4:], c)
}
