//go:build !linux

package udpio

import (
	"net"
	"net/netip"
)

// WriteFrom sends b to to out of conn, from the address the route picks:
// a datagram's destination address is read (Batch.Dst) and named as a
// reply's source on Linux only.
func WriteFrom(conn *net.UDPConn, b []byte, to netip.AddrPort, _ netip.Addr) (n int, gone, err error) {
	n, err = conn.WriteToUDPAddrPort(b, to)
	return n, nil, err
}
