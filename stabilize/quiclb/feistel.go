package quiclb

import (
	"crypto/aes"
	"encoding/binary"
	"math/bits"
)

// half is one side of the four-pass Feistel network: at most 10 octets, as
// half of 19 rounded up. The octets past the codec's half length stay zero,
// so a half is handled as one uint64 and one uint16. It is block-sized to
// hold a server ID.
type half = [aes.BlockSize]byte

// halfMasks returns the masks that keep a left and a right half within
// n octets of plaintext: half of n rounded up, and, for odd n, without the
// left half's last nibble and the right half's first nibble.
func halfMasks(n int) (left, right half) {
	h := (n + 1) / 2
	for i := range h {
		left[i], right[i] = 0xff, 0xff
	}
	if n%2 == 1 {
		left[h-1], right[0] = 0xf0, 0x0f
	}
	return left, right
}

// encryptFeistel encrypts b, the server ID and nonce, in place with the
// draft's four-pass algorithm.
func (c *Codec) encryptFeistel(b []byte) {
	var l, r half
	c.split(&l, &r, b)
	buf := c.scratch()
	c.round(buf, 1, &l, &r, &c.rightMask)
	c.round(buf, 2, &r, &l, &c.leftMask)
	c.round(buf, 3, &l, &r, &c.rightMask)
	c.round(buf, 4, &r, &l, &c.leftMask)
	c.blocks.Put(buf)
	c.join(b, &l, &r)
}

// feistelServerID decrypts b, a four-pass ciphertext, far enough to return
// its server ID: three passes when the server ID lies in the left half,
// four otherwise. buf is scratch. The halves stay in registers, as
// little-endian words of their first eight and next two octets.
func (c *Codec) feistelServerID(b []byte, buf *[aes.BlockSize]byte) ServerID {
	lm0, lm1 := leWords(&c.leftMask)
	rm0, rm1 := leWords(&c.rightMask)
	l0, l1, r0, r1 := c.splitWords(b, lm0, lm1, rm0, rm1)
	// Passes 4, 3 and 2 of round, then 1 if the server ID needs r.
	tail := uint64(c.plen) << 48
	expandWords(buf, r0, r1, tail|4<<56)
	c.block.Encrypt(buf[:], buf[:])
	l0, l1 = xorWords(buf, l0, l1, lm0, lm1)
	expandWords(buf, l0, l1, tail|3<<56)
	c.block.Encrypt(buf[:], buf[:])
	r0, r1 = xorWords(buf, r0, r1, rm0, rm1)
	expandWords(buf, r0, r1, tail|2<<56)
	c.block.Encrypt(buf[:], buf[:])
	l0, l1 = xorWords(buf, l0, l1, lm0, lm1)
	if c.serverIDLen <= c.plen/2 {
		return serverIDFromWords(bits.ReverseBytes64(l0), uint64(bits.ReverseBytes16(l1))<<48, c.serverIDLen)
	}
	expandWords(buf, l0, l1, tail|1<<56)
	c.block.Encrypt(buf[:], buf[:])
	r0, r1 = xorWords(buf, r0, r1, rm0, rm1)
	hi, lo := bits.ReverseBytes64(l0), uint64(bits.ReverseBytes16(l1))<<48
	// The plaintext is l, then r from octet plen-halfLen on: with an odd
	// length, their nibbles of the middle octet merge.
	rhi, rlo := bits.ReverseBytes64(r0), uint64(bits.ReverseBytes16(r1))<<48
	if s := uint(8 * (c.plen - c.halfLen)); s < 64 {
		hi, lo = hi|rhi>>s, lo|rlo>>s|rhi<<(64-s)
	} else {
		lo |= rhi >> (s - 64)
	}
	return serverIDFromWords(hi, lo, c.serverIDLen)
}

// expandWords is expand for a half held as words; tail holds the length
// and pass octets.
func expandWords(buf *[aes.BlockSize]byte, w0 uint64, w1 uint16, tail uint64) {
	le := binary.LittleEndian
	le.PutUint64(buf[:8], w0)
	le.PutUint64(buf[8:], uint64(w1)|tail)
}

// xorWords returns the half d0, d1 xored with the block in buf and masked by
// m0, m1: round's last step on words.
func xorWords(buf *[aes.BlockSize]byte, d0 uint64, d1 uint16, m0 uint64, m1 uint16) (uint64, uint16) {
	le := binary.LittleEndian
	return (d0 ^ le.Uint64(buf[:8])) & m0, (d1 ^ le.Uint16(buf[8:])) & m1
}

// splitWords is split into words, masked by the halves' masks. It loads b
// a word at a time: split's copies would leave stores that the loads of the
// halves could not be forwarded from.
func (c *Codec) splitWords(b []byte, lm0 uint64, lm1 uint16, rm0 uint64, rm1 uint16) (l0 uint64, l1 uint16, r0 uint64, r1 uint16) {
	n, h := len(b), c.halfLen
	le := binary.LittleEndian
	if n < 8 {
		// n >= MinServerIDLen+MinNonceLen = 5, so h is 3 or 4. The right
		// half ends b: load b's last four octets and drop those before it.
		return uint64(le.Uint32(b)) & lm0, 0, uint64(le.Uint32(b[n-4:])>>(8*(4-h))) & rm0, 0
	}
	l0 = le.Uint64(b) & lm0
	if h <= 8 {
		return l0, 0, le.Uint64(b[n-8:]) >> (8 * (8 - h)) & rm0, 0
	}
	// h > 8, so n >= 15: each half has one or two octets past its word.
	l1 = le.Uint16(b[8:]) & lm1
	r0 = le.Uint64(b[n-h:]) & rm0
	r1 = le.Uint16(b[n-2:]) >> (8 * (10 - h)) & rm1
	return l0, l1, r0, r1
}

// leWords returns h's first eight octets and next two as little-endian
// words.
func leWords(h *half) (uint64, uint16) {
	le := binary.LittleEndian
	return le.Uint64(h[:8]), le.Uint16(h[8:])
}

// split copies b into halves l and r. With an odd length, the middle
// octet's high nibble goes to l and its low nibble to r.
func (c *Codec) split(l, r *half, b []byte) {
	copy(l[:c.halfLen], b)
	copy(r[:c.halfLen], b[len(b)-c.halfLen:])
	l[c.halfLen-1] &= c.leftMask[c.halfLen-1]
	r[0] &= c.rightMask[0]
}

// join is the inverse of split.
func (c *Codec) join(b []byte, l, r *half) {
	copy(b[len(b)-c.halfLen:], r[:c.halfLen])
	copy(b, l[:c.halfLen])
	if c.plen%2 == 1 {
		b[c.halfLen-1] = l[c.halfLen-1] | r[0]
	}
}

// round is one pass of the network: dst ^= AES-ECB(expand(plen, pass, src)),
// truncated to the half by mask.
func (c *Codec) round(buf *[aes.BlockSize]byte, pass byte, src, dst, mask *half) {
	expand(buf, byte(c.plen), pass, src)
	c.block.Encrypt(buf[:], buf[:])
	le := binary.LittleEndian
	le.PutUint64(dst[:], (le.Uint64(dst[:])^le.Uint64(buf[:]))&le.Uint64(mask[:]))
	le.PutUint16(dst[8:], (le.Uint16(dst[8:])^le.Uint16(buf[8:]))&le.Uint16(mask[8:]))
}

// expand writes into buf the draft's expand(length, pass, in): in, zero
// padding, then length and pass as the last two octets.
func expand(buf *[aes.BlockSize]byte, length, pass byte, in *half) {
	w0, w1 := leWords(in)
	expandWords(buf, w0, w1, uint64(length)<<48|uint64(pass)<<56)
}
