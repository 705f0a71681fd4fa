package stabilize

import (
	"encoding/binary"
	"net/netip"
)

// maxProxyHeader is the length of the longest header appendProxyV2 makes.
const maxProxyHeader = 16 + 36

// proxyV2Signature starts every PROXY protocol v2 header.
var proxyV2Signature = []byte("\r\n\r\n\x00\r\nQUIT\n")

// appendProxyV2 appends a PROXY protocol v2 header for a UDP datagram from
// src to dst: command PROXY, family INET or INET6 over DGRAM. Mixed
// families are sent as INET6 with IPv4-mapped addresses.
func appendProxyV2(b []byte, src, dst netip.AddrPort) []byte {
	srcIP, dstIP := src.Addr().Unmap(), dst.Addr().Unmap()
	b = append(b, proxyV2Signature...)
	b = append(b, 0x21) // version 2, command PROXY
	if srcIP.Is4() && dstIP.Is4() {
		b = append(b, 0x12) // INET, DGRAM
		b = binary.BigEndian.AppendUint16(b, 12)
		b = append(b, srcIP.AsSlice()...)
		b = append(b, dstIP.AsSlice()...)
	} else {
		b = append(b, 0x22) // INET6, DGRAM
		b = binary.BigEndian.AppendUint16(b, 36)
		s16, d16 := srcIP.As16(), dstIP.As16()
		b = append(b, s16[:]...)
		b = append(b, d16[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}
