//go:build !linux

package udpio

import (
	"net"
	"syscall"
)

// Family is only needed for sendmmsg, which is Linux-only.
func Family(syscall.RawConn) int { return 0 }

// GrowBuffers asks for larger socket buffers.
func GrowBuffers(conn *net.UDPConn, size int) {
	_ = conn.SetReadBuffer(size)
	_ = conn.SetWriteBuffer(size)
}
