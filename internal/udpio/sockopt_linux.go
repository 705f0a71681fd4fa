package udpio

import (
	"net"
	"os"
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
// does for its sockets; a buffer already as large stays. It returns the
// receive buffer's size then.
func GrowBuffers(conn *net.UDPConn, size int) (int, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var rcv int
	cerr := rc.Control(func(fd uintptr) {
		for _, opt := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
			// The kernel reports twice the size it was given.
			if now, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, opt[1]); err == nil && now >= 2*size {
				continue
			}
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[0], size) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[1], size)
			}
		}
		rcv, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
		rcv /= 2
	})
	if cerr != nil {
		return 0, cerr
	}
	return rcv, os.NewSyscallError("getsockopt SO_RCVBUF", err)
}

// HasReusePort reports whether ReusePort works here.
const HasReusePort = true

// ReusePort sets SO_REUSEPORT on a socket before it is bound, as a
// net.ListenConfig's Control: several sockets may then share one address,
// the kernel spreading the datagrams among them by a hash of their source.
func ReusePort(_, _ string, rc syscall.RawConn) error {
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return os.NewSyscallError("setsockopt SO_REUSEPORT", serr)
	}
	return nil
}
