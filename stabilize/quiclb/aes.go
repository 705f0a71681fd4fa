package quiclb

// singlePassServerID decrypts b, the 16 octets after the first octet of a
// single-pass CID, as one AES-128-ECB block and returns its leading server
// ID.
func (c *Codec) singlePassServerID(b []byte) ServerID {
	buf := c.scratch()
	c.block.Decrypt(buf[:], b)
	sid := serverIDFromBlock(buf, c.serverIDLen)
	c.blocks.Put(buf)
	return sid
}
