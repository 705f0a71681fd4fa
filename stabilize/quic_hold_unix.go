//go:build unix

package stabilize

import (
	"errors"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// holdSocket duplicates the descriptor of a listener's socket. It fails
// when the listener has been closed.
func holdSocket(conn *net.UDPConn) (*socketHold, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	f := os.NewFile(uintptr(fd), "quic-listener")
	defer f.Close()
	pc, err := net.FilePacketConn(f) // a duplicate of the duplicate
	if err != nil {
		return nil, err
	}
	udp, ok := pc.(*net.UDPConn)
	if !ok {
		_ = pc.Close()
		return nil, errors.New("not a UDP socket")
	}
	drc, err := udp.SyscallConn()
	if err != nil {
		_ = udp.Close()
		return nil, err
	}
	// The duplicate shares the socket, and so its options.
	return &socketHold{sock: &quicSocket{conn: udp, rc: drc, family: udpio.Family(drc)}}, nil
}
