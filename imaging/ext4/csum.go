package ext4

import (
	"encoding/binary"
	"hash/crc32"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc is the raw crc32c used by ext4 and e2fsprogs (no pre- or post-inversion), expressed with
// Go's inverting crc32.Update.
func crc(c uint32, p []byte) uint32 { return ^crc32.Update(^c, castagnoli, p) }

func crcU32(c, v uint32) uint32 {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return crc(c, b[:])
}

func crcU64(c uint32, v uint64) uint32 {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return crc(c, b[:])
}
