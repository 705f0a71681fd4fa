package udpio

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// Family is the address family of a socket: AF_INET or AF_INET6.
func Family(rc syscall.RawConn) int {
	family := unix.AF_INET6
	_ = rc.Control(func(fd uintptr) {
		if d, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN); err == nil {
			family = d
		}
	})
	return family
}

// GrowBuffers raises a socket's receive and send buffers to size, past the
// system's maximum (net.core.rmem_max) where the process may, as quic-go
// does for its sockets.
func GrowBuffers(conn *net.UDPConn, size int) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		for _, opt := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[0], size) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[1], size)
			}
		}
	})
}
