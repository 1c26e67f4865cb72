package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// Superblock feature bits used by the writer.
const (
	compatHasJournal = 0x4
	compatExtAttr    = 0x8
	compatDirIndex   = 0x20

	incompatFiletype = 0x2
	incompatExtents  = 0x40
	incompat64bit    = 0x80
	incompatFlexBG   = 0x200

	roSparseSuper  = 0x1
	roLargeFile    = 0x2
	roHugeFile     = 0x8
	roDirNlink     = 0x20
	roExtraIsize   = 0x40
	roMetadataCsum = 0x400

	journalIno    = 8
	firstIno      = 11
	extraIsize    = 32
	bgInodeUninit = 1
	bgInodeZeroed = 4
)

// geometry is the final shape of the image.
type geometry struct {
	blocks, groups uint64
	ipg            uint64 // inodes per group
	itb            uint64 // inode table blocks per group
	gdtBlocks      uint64
	journal        uint64 // journal blocks
	bbitmap        []uint64
	ibitmap        []uint64
	itable         []uint64
	jnode          *node
}

func journalSize(blocks uint64) uint64 {
	switch {
	case blocks < 32768:
		return 1024
	case blocks < 256*1024:
		return 4096
	case blocks < 512*1024:
		return 8192
	case blocks < 4096*1024:
		return 16384
	case blocks < 8192*1024:
		return 32768
	case blocks < 16384*1024:
		return 65536
	case blocks < 32768*1024:
		return 131072
	}
	return 262144
}

// identity returns the filesystem UUID and the htree hash seed: both from SHA-256 over the
// format version, the options, the injected files and the input's content hash, or, when a UUID
// is given, that UUID instead of the content (which is then never hashed).
func (b *builder) identity() ([16]byte, [4]uint32, error) {
	var u [16]byte
	if b.opts.UUID != "" {
		p, err := parseUUID(b.opts.UUID)
		if err != nil {
			return u, [4]uint32{}, err
		}
		u = p
		fmt.Fprintf(b.sum, "uuid %x\n", u)
	} else {
		fmt.Fprintf(b.sum, "content %x\n", b.in.Sum(nil))
	}
	d := b.sum.Sum(nil)
	if b.opts.UUID == "" {
		copy(u[:], d[:16])
		u[6] = u[6]&0x0f | 0x80 // RFC 9562 version 8: custom
		u[8] = u[8]&0x3f | 0x80
	}
	var seed [4]uint32
	for i := range seed {
		seed[i] = binary.LittleEndian.Uint32(d[16+4*i:])
	}
	return u, seed, nil
}

func parseUUID(s string) ([16]byte, error) {
	var u [16]byte
	h := strings.ReplaceAll(s, "-", "")
	if len(h) != 32 {
		return u, fmt.Errorf("uuid %q: want 32 hex digits", s)
	}
	for i := 0; i < 16; i++ {
		var v byte
		for _, c := range h[2*i : 2*i+2] {
			v <<= 4
			switch {
			case c >= '0' && c <= '9':
				v |= byte(c - '0')
			case c >= 'a' && c <= 'f':
				v |= byte(c - 'a' + 10)
			case c >= 'A' && c <= 'F':
				v |= byte(c - 'A' + 10)
			default:
				return u, fmt.Errorf("uuid %q: not hex", s)
			}
		}
		u[i] = v
	}
	return u, nil
}

func formatUUID(u [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// finish lays out and writes all metadata. The caller renames the file into place.
func (b *builder) finish() (Result, error) {
	nodes, err := b.t.number()
	if err != nil {
		return Result{}, err
	}
	for _, n := range b.data {
		if n.ino == 0 {
			for _, e := range n.ext {
				b.a.free(run{e.pblk, uint64(e.len)})
			}
		}
	}
	uuid, hseed, err := b.identity()
	if err != nil {
		return Result{}, err
	}
	seed := crc(^uint32(0), uuid[:])
	lastIno := uint32(firstIno - 1)
	if len(nodes) > 0 {
		lastIno = nodes[len(nodes)-1].ino
	}

	// Directory, symlink, extent-tree and xattr blocks follow the data.
	type xblk struct {
		x    []xattr
		blk  uint64
		refs uint32
	}
	shared := map[string]*xblk{}
	var xorder []*xblk
	for _, n := range append([]*node{b.t.root}, nodes...) {
		if err := b.ctx.Err(); err != nil {
			return Result{}, err
		}
		iseed := crcU32(crcU32(seed, n.ino), 0)
		switch n.mode & sIFMT {
		case sIFDIR:
			ents := make([]dirent, 0, len(n.kids))
			for _, name := range sortedNames(n) {
				k := n.kids[name]
				ents = append(ents, dirent{name: name, ino: k.ino, ft: k.fileType()})
			}
			blocks, indexed, err := dirBlocks(n.ino, n.parent.ino, ents, hseed)
			if err != nil {
				return Result{}, err
			}
			sealDir(blocks, indexed, iseed)
			data := make([]byte, 0, len(blocks)*blockSize)
			for _, blk := range blocks {
				data = append(data, blk...)
			}
			if err := b.writeBlocks(n, data); err != nil {
				return Result{}, fmt.Errorf("write directory inode %d: %w", n.ino, err)
			}
			n.size = uint64(len(data))
			n.flags = flagExtents
			if indexed {
				n.flags |= flagIndex
			}
		case sIFLNK:
			n.size = uint64(len(n.target))
			if len(n.target) < 60 {
				copy(n.iblock[:], n.target)
				break
			}
			blk := make([]byte, blockSize)
			copy(blk, n.target)
			if err := b.writeBlocks(n, blk); err != nil {
				return Result{}, fmt.Errorf("write symlink inode %d: %w", n.ino, err)
			}
			n.flags = flagExtents
		case sIFREG:
			n.flags = flagExtents
		case sIFCHR, sIFBLK:
			if n.major < 256 && n.minor < 256 {
				binary.LittleEndian.PutUint32(n.iblock[0:], n.major<<8|n.minor)
			} else {
				binary.LittleEndian.PutUint32(n.iblock[4:], n.minor&0xff|n.major<<8|(n.minor&^0xff)<<12)
			}
		}
		if n.flags&flagExtents != 0 {
			if n.iblock, err = b.extentTree(n, iseed); err != nil {
				return Result{}, fmt.Errorf("write extent tree of inode %d: %w", n.ino, err)
			}
		}
		if len(n.xattrs) > 0 {
			var probe [inodeSize]byte
			if _, ok := encodeXattrs(probe[:], n.xattrs, 128+extraIsize+4, inodeSize, 128+extraIsize+4); !ok {
				key := xattrKey(n.xattrs)
				x := shared[key]
				if x == nil {
					at, _, err := b.a.take(1)
					if err != nil {
						return Result{}, err
					}
					x = &xblk{x: n.xattrs, blk: at}
					shared[key] = x
					xorder = append(xorder, x)
				}
				x.refs++
				n.xblock = x.blk
			}
		}
	}
	for _, x := range xorder {
		blk, err := xattrBlock(x.x, x.refs, x.blk, seed)
		if err != nil {
			return Result{}, err
		}
		if _, err := b.w.WriteAt(blk, int64(x.blk)*blockSize); err != nil {
			return Result{}, err
		}
	}

	g, err := b.plan(uint64(lastIno))
	if err != nil {
		return Result{}, err
	}
	if g.jnode != nil {
		if g.jnode.iblock, err = b.extentTree(g.jnode, crcU32(crcU32(seed, journalIno), 0)); err != nil {
			return Result{}, fmt.Errorf("write journal extent tree: %w", err)
		}
		if err := b.writeJournal(g, uuid); err != nil {
			return Result{}, err
		}
	}
	if b.a.next > g.blocks {
		return Result{}, fmt.Errorf("%w: %d blocks needed, %d available", ErrNoSpace, b.a.next, g.blocks)
	}
	byIno := func(ino uint32) *node {
		switch {
		case ino == 2:
			return b.t.root
		case ino == journalIno:
			return g.jnode
		case ino >= firstIno && ino <= lastIno:
			return nodes[ino-firstIno]
		}
		return nil
	}
	descs := make([]byte, g.groups*descSize)
	var freeBlocks, freeInodes uint64
	b.a.sortFreed()
	fi := 0
	bm := make([]byte, blockSize)
	im := make([]byte, blockSize)
	itab := make([]byte, g.itb*blockSize)
	for grp := uint64(0); grp < g.groups; grp++ {
		if err := b.ctx.Err(); err != nil {
			return Result{}, err
		}
		used := b.a.usedBitmap(bm, grp, g.blocks, g.gdtBlocks, &fi)
		clear(im)
		clear(itab)
		var usedInodes, dirs, lastUsed uint64
		for i := uint64(0); i < g.ipg; i++ {
			ino := uint32(grp*g.ipg + i + 1)
			n := byIno(ino)
			if n == nil && ino >= firstIno {
				continue
			}
			im[i/8] |= 1 << (i % 8)
			usedInodes++
			lastUsed = i + 1
			if n == nil {
				continue // reserved inode, left zero
			}
			if n.isDir() {
				dirs++
			}
			b.encodeInode(itab[i*inodeSize:(i+1)*inodeSize], n, ino, seed)
		}
		for i := g.ipg; i < blockSize*8; i++ {
			im[i/8] |= 1 << (i % 8)
		}
		for i := uint64(0); i < g.itb; i++ {
			blk := itab[i*blockSize : (i+1)*blockSize]
			if isZero(blk, b.zero) {
				continue
			}
			if _, err := b.w.WriteAt(blk, int64(g.itable[grp]+i)*blockSize); err != nil {
				return Result{}, fmt.Errorf("write inode table of group %d: %w", grp, err)
			}
		}
		// Empty groups cost no host space: an all-zero block bitmap stays a hole, and a group with
		// no inode in use is marked INODE_UNINIT, so its bitmap (zero but for the padding bits)
		// is never read and need not be written (e2fsck and the kernel treat it as empty).
		if !isZero(bm, b.zero) {
			if _, err := b.w.WriteAt(bm, int64(g.bbitmap[grp])*blockSize); err != nil {
				return Result{}, fmt.Errorf("write block bitmap of group %d: %w", grp, err)
			}
		}
		bgFlags := uint16(bgInodeZeroed)
		if usedInodes == 0 {
			bgFlags |= bgInodeUninit
		} else if _, err := b.w.WriteAt(im, int64(g.ibitmap[grp])*blockSize); err != nil {
			return Result{}, fmt.Errorf("write inode bitmap of group %d: %w", grp, err)
		}
		inGroup := min(blocksPerGroup, g.blocks-grp*blocksPerGroup)
		fb, fin := inGroup-used, g.ipg-usedInodes
		freeBlocks += fb
		freeInodes += fin
		d := descs[grp*descSize : (grp+1)*descSize]
		put32x2(d, 0, 32, g.bbitmap[grp])
		put32x2(d, 4, 36, g.ibitmap[grp])
		put32x2(d, 8, 40, g.itable[grp])
		put16x2(d, 12, 44, fb)
		put16x2(d, 14, 46, fin)
		put16x2(d, 16, 48, dirs)
		binary.LittleEndian.PutUint16(d[18:], bgFlags)
		put16x2(d, 28, 50, g.ipg-lastUsed)
		bc := crc(seed, bm)
		put16x2(d, 24, 56, uint64(bc))
		ic := crc(seed, im[:g.ipg/8])
		put16x2(d, 26, 58, uint64(ic))
		c := crc(crcU32(seed, uint32(grp)), d)
		binary.LittleEndian.PutUint16(d[30:], uint16(c))
	}

	// Superblock and descriptor copies.
	for grp := uint64(0); grp < g.groups; grp++ {
		if !hasSuper(grp) {
			continue
		}
		sb := b.superblock(g, grp, uuid, hseed, freeBlocks, freeInodes)
		off := int64(grp) * blocksPerGroup * blockSize
		if grp == 0 {
			off = 1024
		}
		if _, err := b.w.WriteAt(sb, off); err != nil {
			return Result{}, fmt.Errorf("write superblock copy in group %d: %w", grp, err)
		}
		if _, err := b.w.WriteAt(descs, int64(grp*blocksPerGroup+1)*blockSize); err != nil {
			return Result{}, fmt.Errorf("write group descriptors in group %d: %w", grp, err)
		}
	}
	if err := b.w.Flush(); err != nil {
		return Result{}, fmt.Errorf("write image: %w", err)
	}
	if err := b.f.Truncate(int64(g.blocks) * blockSize); err != nil {
		return Result{}, fmt.Errorf("size image: %w", err)
	}
	return Result{UUID: formatUUID(uuid), Size: int64(g.blocks) * blockSize}, nil
}

func put32x2(d []byte, lo, hi int, v uint64) {
	binary.LittleEndian.PutUint32(d[lo:], uint32(v))
	binary.LittleEndian.PutUint32(d[hi:], uint32(v>>32))
}

func put16x2(d []byte, lo, hi int, v uint64) {
	binary.LittleEndian.PutUint16(d[lo:], uint16(v))
	binary.LittleEndian.PutUint16(d[hi:], uint16(v>>16))
}

// plan chooses the image size (when automatic), inodes per group, and places bitmaps, inode
// tables and the journal after everything written so far.
func (b *builder) plan(inodes uint64) (geometry, error) {
	free := uint64(0)
	if b.a.limit == 0 {
		fr := b.opts.Free
		if fr == 0 {
			fr = max(64<<20, b.bytes/10)
		}
		free = (uint64(fr) + blockSize - 1) / blockSize
	}
	wantInodes := func(blocks uint64) uint64 {
		if b.a.limit != 0 {
			return max(inodes+16, blocks*blockSize/16384)
		}
		return inodes + 16 + free*blockSize/16384
	}
	groups := uint64(1)
	if b.a.limit != 0 {
		groups = (b.a.limit + blocksPerGroup - 1) / blocksPerGroup
	} else {
		groups = max(1, (b.a.next+free+blocksPerGroup-1)/blocksPerGroup)
	}
	for {
		var g geometry
		g.groups = groups
		g.gdtBlocks = (groups*descSize + blockSize - 1) / blockSize
		size := b.a.limit
		if size == 0 {
			size = groups * blocksPerGroup
		}
		want := min(wantInodes(size), 1<<32-1)
		g.ipg = ((want+groups-1)/groups + 15) &^ 15
		for g.ipg*groups > 1<<32-1 {
			g.ipg -= 16
		}
		if g.ipg > blocksPerGroup {
			if b.a.limit != 0 {
				if inodes+16 > groups*blocksPerGroup {
					return g, fmt.Errorf("%w: %d inodes need more groups", ErrNoSpace, inodes)
				}
				g.ipg = blocksPerGroup
			} else {
				groups = (want + blocksPerGroup - 1) / blocksPerGroup
				continue
			}
		}
		g.itb = g.ipg * inodeSize / blockSize
		if !b.opts.NoJournal {
			g.journal = journalSize(size)
		}
		a := b.a.clone()
		if err := layoutMeta(a, &g); err != nil {
			if b.a.limit == 0 && errors.Is(err, ErrNoSpace) {
				groups++
				continue
			}
			return g, err
		}
		if b.a.limit != 0 {
			g.blocks = b.a.limit
			*b.a = *a
			return g, nil
		}
		blocks := a.next + free
		need := (blocks + blocksPerGroup - 1) / blocksPerGroup
		if need > groups {
			groups = need
			continue
		}
		last := (groups - 1) * blocksPerGroup
		blocks = max(blocks, last+a.header(groups-1)+64)
		g.blocks = blocks
		*b.a = *a
		return g, nil
	}
}

// layoutMeta allocates per-group bitmaps and inode tables and the journal.
func layoutMeta(a *allocator, g *geometry) error {
	g.bbitmap = make([]uint64, g.groups)
	g.ibitmap = make([]uint64, g.groups)
	g.itable = make([]uint64, g.groups)
	for i := uint64(0); i < g.groups; i++ {
		var err error
		if g.bbitmap[i], err = a.takeContig(1); err != nil {
			return err
		}
		if g.ibitmap[i], err = a.takeContig(1); err != nil {
			return err
		}
		if g.itable[i], err = a.takeContig(g.itb); err != nil {
			return err
		}
	}
	if g.journal == 0 {
		return nil
	}
	j := &node{mode: sIFREG | 0o600, nlink: 1, size: g.journal * blockSize, flags: flagExtents, ino: journalIno}
	for l := uint64(0); l < g.journal; {
		start, got, err := a.take(g.journal - l)
		if err != nil {
			return err
		}
		addExtent(j, l, start, got)
		l += got
	}
	// Extent tree blocks, if any, are taken when the tree is written; keep room for them.
	if len(j.ext) > 4 {
		if _, _, err := a.clone().take(uint64(len(j.ext)/extentsPerBlk + 1)); err != nil {
			return err
		}
	}
	g.jnode = j
	return nil
}
