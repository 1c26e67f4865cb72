package ext4

import "encoding/binary"

const (
	extentMagic   = 0xF30A
	extentsPerBlk = (blockSize - 12 - 4) / 12 // 4-byte checksum tail
)

// putExtentHeader writes an extent node header.
func putExtentHeader(b []byte, entries, max, depth int) {
	binary.LittleEndian.PutUint16(b, extentMagic)
	binary.LittleEndian.PutUint16(b[2:], uint16(entries))
	binary.LittleEndian.PutUint16(b[4:], uint16(max))
	binary.LittleEndian.PutUint16(b[6:], uint16(depth))
}

func putLeafEntry(b []byte, e extent) {
	binary.LittleEndian.PutUint32(b, e.lblk)
	binary.LittleEndian.PutUint16(b[4:], uint16(e.len))
	binary.LittleEndian.PutUint16(b[6:], uint16(e.pblk>>32))
	binary.LittleEndian.PutUint32(b[8:], uint32(e.pblk))
}

func putIndexEntry(b []byte, lblk uint32, blk uint64) {
	binary.LittleEndian.PutUint32(b, lblk)
	binary.LittleEndian.PutUint32(b[4:], uint32(blk))
	binary.LittleEndian.PutUint16(b[8:], uint16(blk>>32))
}

// extentTree builds the i_block contents for n's extents, allocating and writing tree blocks
// when more than four extents are needed. Leaves are packed full and the tree is as shallow as
// possible, which is what e2fsck considers optimal.
func (b *builder) extentTree(n *node, iseed uint32) ([60]byte, error) {
	var root [60]byte
	if len(n.ext) <= 4 {
		putExtentHeader(root[:], len(n.ext), 4, 0)
		for i, e := range n.ext {
			putLeafEntry(root[12+12*i:], e)
		}
		return root, nil
	}
	type ref struct {
		lblk uint32
		blk  uint64
	}
	// Leaves.
	var level []ref
	for i := 0; i < len(n.ext); i += extentsPerBlk {
		part := n.ext[i:min(i+extentsPerBlk, len(n.ext))]
		blk := make([]byte, blockSize)
		putExtentHeader(blk, len(part), extentsPerBlk, 0)
		for j, e := range part {
			putLeafEntry(blk[12+12*j:], e)
		}
		at, err := b.treeBlock(n, blk, iseed)
		if err != nil {
			return root, err
		}
		level = append(level, ref{part[0].lblk, at})
	}
	depth := 1
	for len(level) > 4 {
		var up []ref
		for i := 0; i < len(level); i += extentsPerBlk {
			part := level[i:min(i+extentsPerBlk, len(level))]
			blk := make([]byte, blockSize)
			putExtentHeader(blk, len(part), extentsPerBlk, depth)
			for j, r := range part {
				putIndexEntry(blk[12+12*j:], r.lblk, r.blk)
			}
			at, err := b.treeBlock(n, blk, iseed)
			if err != nil {
				return root, err
			}
			up = append(up, ref{part[0].lblk, at})
		}
		level = up
		depth++
	}
	putExtentHeader(root[:], len(level), 4, depth)
	for i, r := range level {
		putIndexEntry(root[12+12*i:], r.lblk, r.blk)
	}
	return root, nil
}

func (b *builder) treeBlock(n *node, blk []byte, iseed uint32) (uint64, error) {
	binary.LittleEndian.PutUint32(blk[blockSize-4:], crc(iseed, blk[:blockSize-4]))
	at, _, err := b.a.take(1)
	if err != nil {
		return 0, err
	}
	if _, err := b.w.WriteAt(blk, int64(at)*blockSize); err != nil {
		return 0, err
	}
	n.tree = append(n.tree, at)
	return at, nil
}
