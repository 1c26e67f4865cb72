package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Extended attribute name indexes (e_name_index).
const (
	xattrUser       = 1
	xattrACLAccess  = 2
	xattrACLDefault = 3
	xattrTrusted    = 4
	xattrSecurity   = 6
)

const xattrMagic = 0xEA020000

// splitXattrName maps a full attribute name to its on-disk index and suffix. ok is false for
// namespaces ext4 cannot store (they are dropped, as the kernel would refuse them).
func splitXattrName(full string) (index uint8, name string, ok bool) {
	switch {
	case full == "system.posix_acl_access":
		return xattrACLAccess, "", true
	case full == "system.posix_acl_default":
		return xattrACLDefault, "", true
	case strings.HasPrefix(full, "user."):
		return xattrUser, full[5:], true
	case strings.HasPrefix(full, "trusted."):
		return xattrTrusted, full[8:], true
	case strings.HasPrefix(full, "security."):
		return xattrSecurity, full[9:], true
	}
	return 0, "", false
}

// newXattr converts an attribute as the VFS presents it (tar SCHILY.xattr.*, getxattr) to its
// ext4 form; POSIX ACLs change encoding.
func newXattr(full string, value []byte) (xattr, bool, error) {
	idx, name, ok := splitXattrName(full)
	if !ok {
		return xattr{}, false, nil
	}
	if len(name) > 255 {
		return xattr{}, false, fmt.Errorf("xattr %q: name too long", full)
	}
	if idx == xattrACLAccess || idx == xattrACLDefault {
		v, err := aclToDisk(value)
		if err != nil {
			return xattr{}, false, fmt.Errorf("xattr %s: %w", full, err)
		}
		value = v
	}
	return xattr{index: idx, name: name, value: value}, true, nil
}

// POSIX ACL tags.
const (
	aclUserObj  = 0x01
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclGroup    = 0x08
	aclMask     = 0x10
	aclOther    = 0x20
)

// aclToDisk converts the VFS ACL encoding (version 2, 8-byte entries) to ext4's (version 1, short
// 4-byte entries for the entries without an id).
func aclToDisk(v []byte) ([]byte, error) {
	if len(v) < 4 || (len(v)-4)%8 != 0 || binary.LittleEndian.Uint32(v) != 2 {
		return nil, errors.New("malformed POSIX ACL")
	}
	out := binary.LittleEndian.AppendUint32(nil, 1)
	for p := v[4:]; len(p) > 0; p = p[8:] {
		tag := binary.LittleEndian.Uint16(p)
		out = append(out, p[:4]...)
		switch tag {
		case aclUser, aclGroup:
			out = append(out, p[4:8]...)
		case aclUserObj, aclGroupObj, aclMask, aclOther:
		default:
			return nil, fmt.Errorf("POSIX ACL: unknown tag %#x", tag)
		}
	}
	return out, nil
}

// sortXattrs orders attributes as ext4 searches them and drops earlier duplicates.
func sortXattrs(x []xattr) []xattr {
	sort.SliceStable(x, func(i, j int) bool {
		a, b := x[i], x[j]
		if a.index != b.index {
			return a.index < b.index
		}
		if len(a.name) != len(b.name) {
			return len(a.name) < len(b.name)
		}
		return a.name < b.name
	})
	out := x[:0]
	for i, a := range x {
		if i+1 < len(x) && x[i+1].index == a.index && x[i+1].name == a.name {
			continue
		}
		out = append(out, a)
	}
	return out
}

func pad4(n int) int { return (n + 3) &^ 3 }

func xattrEntryHash(a xattr) uint32 {
	var h uint32
	for i := 0; i < len(a.name); i++ {
		h = h<<5 ^ h>>27 ^ uint32(a.name[i])
	}
	var w [4]byte
	for i := 0; i < len(a.value); i += 4 {
		w = [4]byte{}
		copy(w[:], a.value[i:])
		h = h<<16 ^ h>>16 ^ binary.LittleEndian.Uint32(w[:])
	}
	return h
}

// encodeXattrs lays out entries from entOff and values downward from end, value offsets relative
// to base. It returns the entry hashes, or false when they do not fit.
func encodeXattrs(dst []byte, x []xattr, entOff, end, base int) ([]uint32, bool) {
	need := 4
	for _, a := range x {
		need += pad4(16+len(a.name)) + pad4(len(a.value))
	}
	if entOff+need > end {
		return nil, false
	}
	hashes := make([]uint32, len(x))
	p, v := entOff, end
	for i, a := range x {
		v -= pad4(len(a.value))
		e := dst[p:]
		e[0] = uint8(len(a.name))
		e[1] = a.index
		if len(a.value) > 0 {
			binary.LittleEndian.PutUint16(e[2:], uint16(v-base))
			copy(dst[v:], a.value)
		}
		binary.LittleEndian.PutUint32(e[8:], uint32(len(a.value)))
		hashes[i] = xattrEntryHash(a)
		binary.LittleEndian.PutUint32(e[12:], hashes[i])
		copy(e[16:], a.name)
		p += pad4(16 + len(a.name))
	}
	return hashes, true
}

// xattrKey identifies an attribute set so identical sets share one block.
func xattrKey(x []xattr) string {
	var b bytes.Buffer
	for _, a := range x {
		fmt.Fprintf(&b, "%d:%d:%s:%d:", a.index, len(a.name), a.name, len(a.value))
		b.Write(a.value)
	}
	return b.String()
}

// xattrBlock encodes a shared attribute block (h_blocks 1) with its checksum.
func xattrBlock(x []xattr, refcount uint32, blk uint64, seed uint32) ([]byte, error) {
	b := make([]byte, blockSize)
	binary.LittleEndian.PutUint32(b[0:], xattrMagic)
	binary.LittleEndian.PutUint32(b[4:], refcount)
	binary.LittleEndian.PutUint32(b[8:], 1)
	hashes, ok := encodeXattrs(b, x, 32, blockSize, 0)
	if !ok {
		return nil, errors.New("extended attributes larger than one block")
	}
	var h uint32
	for _, eh := range hashes {
		if eh == 0 { // the kernel treats such a block as unshareable
			h = 0
			break
		}
		h = h<<16 ^ h>>16 ^ eh
	}
	binary.LittleEndian.PutUint32(b[12:], h)
	c := crcU64(seed, blk)
	binary.LittleEndian.PutUint32(b[16:], crc(c, b))
	return b, nil
}
