package quiclb

// appendPlaintext appends a plaintext connection ID: the first octet, the
// server ID and the nonce. With a key, the last two are encrypted in place.
func appendPlaintext(dst []byte, first byte, serverID, nonce []byte) []byte {
	dst = append(dst, first)
	dst = append(dst, serverID...)
	return append(dst, nonce...)
}

// plaintextServerID returns the server ID at the start of an unencrypted
// CID's octets after the first.
func plaintextServerID(b []byte, n int) ServerID {
	return serverIDFrom(b[:n])
}
