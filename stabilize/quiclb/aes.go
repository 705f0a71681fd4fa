package quiclb

import "crypto/aes"

// singlePassServerID decrypts b, the 16 octets after the first octet of a
// single-pass CID, as one AES-128-ECB block and returns its leading server
// ID. buf is scratch.
func (c *Codec) singlePassServerID(b []byte, buf *[aes.BlockSize]byte) ServerID {
	c.block.Decrypt(buf[:], b)
	return serverIDFromBlock(buf, c.serverIDLen)
}
