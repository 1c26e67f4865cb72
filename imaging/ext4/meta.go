package ext4

import (
	"encoding/binary"
	"fmt"
)

// FormatVersion is mixed into the content hash: bump it whenever the writer's output changes for
// the same input, so a UUID never names two different images.
// 2: content hash in parallel 256 KiB leaves; an explicit UUID skips it. 3: groups without
// inodes in use are INODE_UNINIT.
const FormatVersion = 3

func putTime(d []byte, lo, extra int, t timespec) {
	binary.LittleEndian.PutUint32(d[lo:], uint32(t.sec))
	epoch := uint32((t.sec-int64(int32(t.sec)))>>32) & 3
	if extra >= 0 {
		binary.LittleEndian.PutUint32(d[extra:], t.nsec<<2|epoch)
	}
}

// encodeInode writes n as inode ino into d (inodeSize bytes, zeroed).
func (b *builder) encodeInode(d []byte, n *node, ino, seed uint32) {
	le := binary.LittleEndian
	le.PutUint16(d[0:], n.mode)
	le.PutUint16(d[2:], uint16(n.uid))
	le.PutUint16(d[120:], uint16(n.uid>>16))
	le.PutUint16(d[24:], uint16(n.gid))
	le.PutUint16(d[122:], uint16(n.gid>>16))
	le.PutUint32(d[4:], uint32(n.size))
	le.PutUint32(d[108:], uint32(n.size>>32))
	putTime(d, 8, 140, n.atime)
	putTime(d, 12, 132, n.ctime)
	putTime(d, 16, 136, n.mtime)
	putTime(d, 144, 148, n.mtime) // creation time: archives do not carry one
	le.PutUint16(d[26:], uint16(n.nlink))
	var blocks uint64
	for _, e := range n.ext {
		blocks += uint64(e.len)
	}
	blocks += uint64(len(n.tree))
	if n.xblock != 0 {
		blocks++
		le.PutUint32(d[104:], uint32(n.xblock))
		le.PutUint16(d[118:], uint16(n.xblock>>32))
	}
	sectors := blocks * (blockSize / 512)
	le.PutUint32(d[28:], uint32(sectors))
	le.PutUint16(d[116:], uint16(sectors>>32))
	le.PutUint32(d[32:], n.flags)
	copy(d[40:100], n.iblock[:])
	le.PutUint16(d[128:], extraIsize)
	if len(n.xattrs) > 0 && n.xblock == 0 {
		const at = 128 + extraIsize
		le.PutUint32(d[at:], xattrMagic)
		encodeXattrs(d, n.xattrs, at+4, inodeSize, at+4)
	}
	c := crcU32(crcU32(seed, ino), 0)
	c = crc(c, d)
	le.PutUint16(d[124:], uint16(c))
	le.PutUint16(d[130:], uint16(c>>16))
}

// superblock encodes the superblock copy for group grp.
func (b *builder) superblock(g geometry, grp uint64, uuid [16]byte, hseed [4]uint32, freeBlocks, freeInodes uint64) []byte {
	le := binary.LittleEndian
	s := make([]byte, 1024)
	le.PutUint32(s[0:], uint32(g.groups*g.ipg))
	put32x2(s, 4, 336, g.blocks)
	put32x2(s, 12, 344, freeBlocks)
	le.PutUint32(s[16:], uint32(freeInodes))
	le.PutUint32(s[24:], 2) // 4 KiB blocks
	le.PutUint32(s[28:], 2)
	le.PutUint32(s[32:], blocksPerGroup)
	le.PutUint32(s[36:], blocksPerGroup)
	le.PutUint32(s[40:], uint32(g.ipg))
	le.PutUint16(s[54:], 0xFFFF) // no mount-count check
	le.PutUint16(s[56:], 0xEF53)
	le.PutUint16(s[58:], 1) // clean
	le.PutUint16(s[60:], 1) // continue on errors
	le.PutUint32(s[76:], 1) // dynamic revision
	le.PutUint32(s[84:], firstIno)
	le.PutUint16(s[88:], inodeSize)
	le.PutUint16(s[90:], uint16(grp))
	compat := uint32(compatExtAttr | compatDirIndex)
	if g.jnode != nil {
		compat |= compatHasJournal
	}
	le.PutUint32(s[92:], compat)
	le.PutUint32(s[96:], incompatFiletype|incompatExtents|incompat64bit|incompatFlexBG)
	le.PutUint32(s[100:], roSparseSuper|roLargeFile|roHugeFile|roDirNlink|roExtraIsize|roMetadataCsum)
	copy(s[104:120], uuid[:])
	copy(s[120:136], b.opts.Label)
	for i, v := range hseed {
		le.PutUint32(s[236+4*i:], v)
	}
	s[252] = 1 // half_md4
	le.PutUint16(s[254:], descSize)
	le.PutUint32(s[256:], 0x000C) // user_xattr, acl
	if j := g.jnode; j != nil {
		le.PutUint32(s[224:], journalIno)
		s[253] = 1 // s_jnl_blocks holds a copy of the journal's i_block
		for i := 0; i < 15; i++ {
			le.PutUint32(s[268+4*i:], le.Uint32(j.iblock[4*i:]))
		}
		le.PutUint32(s[268+60:], uint32(j.size>>32))
		le.PutUint32(s[268+64:], uint32(j.size))
	}
	le.PutUint16(s[348:], extraIsize)
	le.PutUint16(s[350:], extraIsize)
	le.PutUint32(s[352:], 2) // unsigned directory hash
	s[372] = 4               // 16 groups per flex group
	s[373] = 1               // crc32c
	le.PutUint32(s[1020:], crc(^uint32(0), s[:1020]))
	return s
}

// writeJournal writes the JBD2 superblock of an empty, clean journal; the rest stays zero.
func (b *builder) writeJournal(g geometry, uuid [16]byte) error {
	be := binary.BigEndian
	j := make([]byte, blockSize)
	be.PutUint32(j[0:], 0xC03B3998)
	be.PutUint32(j[4:], 4) // superblock v2
	be.PutUint32(j[12:], blockSize)
	be.PutUint32(j[16:], uint32(g.journal))
	be.PutUint32(j[20:], 1)   // first log block
	be.PutUint32(j[24:], 1)   // sequence
	be.PutUint32(j[40:], 0x2) // incompat 64bit
	copy(j[48:64], uuid[:])
	be.PutUint32(j[64:], 1) // users
	if _, err := b.w.WriteAt(j, int64(g.jnode.ext[0].pblk)*blockSize); err != nil {
		return fmt.Errorf("write journal superblock: %w", err)
	}
	return nil
}
