package udpio

import (
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Sender sends datagrams from one socket without ever blocking: a datagram
// the socket's buffer cannot take is dropped with ErrWouldBlock. One
// goroutine at a time may use a Sender; it allocates nothing per send.
type Sender struct {
	rc     syscall.RawConn
	family int

	b     []byte
	sa    unix.RawSockaddrInet6
	salen uint32
	errno syscall.Errno
	sendf func(fd uintptr) bool // s.send, bound once
}

// NewSender returns a Sender for conn.
func NewSender(conn *net.UDPConn) (*Sender, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	s := &Sender{rc: rc, family: Family(rc)}
	s.sendf = s.send
	return s, nil
}

func (s *Sender) send(fd uintptr) bool {
	_, _, s.errno = unix.Syscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(unsafe.SliceData(s.b))),
		uintptr(len(s.b)), unix.MSG_DONTWAIT, uintptr(unsafe.Pointer(&s.sa)), uintptr(s.salen))
	return true // never wait for the socket
}

// SendTo sends b to to.
func (s *Sender) SendTo(b []byte, to netip.AddrPort) error {
	s.b = b
	s.salen = putSockaddr(&s.sa, s.family, to)
	err := s.rc.Write(s.sendf)
	s.b = nil
	switch {
	case err != nil:
		return err
	case s.errno == unix.EAGAIN:
		return ErrWouldBlock
	case s.errno != 0:
		return s.errno
	}
	return nil
}
