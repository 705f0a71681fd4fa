//go:build !linux

package udpio

import (
	"errors"
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

// HasReusePort reports whether ReusePort works here: Linux only.
const HasReusePort = false

// ReusePort is Linux-only.
func ReusePort(_, _ string, _ syscall.RawConn) error { return errors.ErrUnsupported }
