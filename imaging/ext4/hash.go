package ext4

import "math/bits"

// dirHash is the htree name hash: half-MD4 with the unsigned-char message encoding
// (DX_HASH_HALF_MD4_UNSIGNED), the variant selected by EXT2_FLAGS_UNSIGNED_HASH in the superblock.
// It returns the major hash with the low bit cleared, as ext4 stores it.
func dirHash(name []byte, seed [4]uint32) uint32 {
	buf := [4]uint32{0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476}
	if seed != [4]uint32{} {
		buf = seed
	}
	var in [8]uint32
	p := name
	for n := len(p); n > 0; n -= 32 {
		strToHashBuf(p, n, in[:])
		halfMD4(&buf, &in)
		if len(p) > 32 {
			p = p[32:]
		} else {
			p = nil
		}
	}
	h := buf[1] &^ 1
	if h == 0x7fffffff<<1 {
		h = (0x7fffffff - 1) << 1
	}
	return h
}

// strToHashBuf packs up to 4*len(out) bytes of msg into words, padding with a length-derived
// pattern; n is the remaining message length (it may exceed len(msg) only never: callers pass
// n == len(msg)).
func strToHashBuf(msg []byte, n int, out []uint32) {
	pad := uint32(n) | uint32(n)<<8
	pad |= pad << 16
	val := pad
	num := len(out)
	if n > num*4 {
		n = num * 4
	}
	o := 0
	for i := 0; i < n; i++ {
		val = uint32(msg[i]) + val<<8
		if i%4 == 3 {
			out[o] = val
			o++
			val = pad
			num--
		}
	}
	num--
	if num >= 0 {
		out[o] = val
		o++
	}
	for num--; num >= 0; num-- {
		out[o] = pad
		o++
	}
}

func halfMD4(buf *[4]uint32, in *[8]uint32) {
	const k2, k3 = 013240474631, 015666365641
	f := func(x, y, z uint32) uint32 { return z ^ (x & (y ^ z)) }
	g := func(x, y, z uint32) uint32 { return (x & y) + ((x ^ y) & z) }
	h := func(x, y, z uint32) uint32 { return x ^ y ^ z }
	a, b, c, d := buf[0], buf[1], buf[2], buf[3]
	r := func(fn func(x, y, z uint32) uint32, a *uint32, b, c, d, x uint32, s int) {
		*a = bits.RotateLeft32(*a+fn(b, c, d)+x, s)
	}
	r(f, &a, b, c, d, in[0], 3)
	r(f, &d, a, b, c, in[1], 7)
	r(f, &c, d, a, b, in[2], 11)
	r(f, &b, c, d, a, in[3], 19)
	r(f, &a, b, c, d, in[4], 3)
	r(f, &d, a, b, c, in[5], 7)
	r(f, &c, d, a, b, in[6], 11)
	r(f, &b, c, d, a, in[7], 19)

	r(g, &a, b, c, d, in[1]+k2, 3)
	r(g, &d, a, b, c, in[3]+k2, 5)
	r(g, &c, d, a, b, in[5]+k2, 9)
	r(g, &b, c, d, a, in[7]+k2, 13)
	r(g, &a, b, c, d, in[0]+k2, 3)
	r(g, &d, a, b, c, in[2]+k2, 5)
	r(g, &c, d, a, b, in[4]+k2, 9)
	r(g, &b, c, d, a, in[6]+k2, 13)

	r(h, &a, b, c, d, in[3]+k3, 3)
	r(h, &d, a, b, c, in[7]+k3, 9)
	r(h, &c, d, a, b, in[2]+k3, 11)
	r(h, &b, c, d, a, in[6]+k3, 15)
	r(h, &a, b, c, d, in[1]+k3, 3)
	r(h, &d, a, b, c, in[5]+k3, 9)
	r(h, &c, d, a, b, in[0]+k3, 11)
	r(h, &b, c, d, a, in[4]+k3, 15)

	buf[0] += a
	buf[1] += b
	buf[2] += c
	buf[3] += d
}
