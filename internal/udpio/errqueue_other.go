//go:build !linux

package udpio

import (
	"net/netip"
	"syscall"
)

// ICMPError is an ICMP error the kernel reported for a datagram sent from a
// socket. Outside Linux there are none.
type ICMPError struct {
	Dest     netip.AddrPort
	Offender netip.Addr
	Origin   uint8
	Type     uint8
	Code     uint8
}

// Origins of an ICMPError.
const (
	OriginICMP  = 2
	OriginICMP6 = 3
)

// EnableICMPErrors does nothing: outside Linux, unconnected UDP sockets are
// not told of ICMP errors, so passive checks rely on reply_timeout.
func EnableICMPErrors(syscall.Conn) error { return nil }

// ReadErrQueue finds nothing: there is no error queue.
func ReadErrQueue(syscall.Conn, []ICMPError) (int, error) { return 0, nil }
