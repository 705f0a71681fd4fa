//go:build !linux

package udpio

import (
	"errors"
	"net"
	"syscall"
)

// Family is only needed for sendmmsg, which is Linux-only.
func Family(syscall.RawConn) int { return 0 }

// GrowBuffers asks for receive and send buffers of size, and returns the
// receive buffer's size: size, as it cannot be read back here.
func GrowBuffers(conn *net.UDPConn, size int) (int, error) {
	_ = conn.SetWriteBuffer(size)
	if err := conn.SetReadBuffer(size); err != nil {
		return 0, err
	}
	return size, nil
}

// HasReusePort reports whether ReusePort works here: Linux only.
const HasReusePort = false

// ReusePort is Linux-only.
func ReusePort(_, _ string, _ syscall.RawConn) error { return errors.ErrUnsupported }
