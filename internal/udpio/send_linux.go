package udpio

import (
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

	q        *SendQueue
	from, to int
	sent     int
	segment  int                   // of a GSO send; 0: sendmmsg
	sendqf   func(fd uintptr) bool // s.sendQueued, bound once
}

// NewSender returns a Sender for conn.
func NewSender(conn syscall.Conn) (*Sender, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	s := &Sender{rc: rc, family: Family(rc)}
	s.sendf = s.send
	s.sendqf = s.sendQueued
	return s, nil
}

// Family is the socket's address family, for SendQueue.Add.
func (s *Sender) Family() int { return s.family }

func (s *Sender) sendQueued(fd uintptr) bool {
	if s.segment > 0 {
		s.sent, s.errno = s.to-s.from, s.q.SendGSO(fd, s.from, s.to, s.segment)
	} else {
		s.sent, s.errno = s.q.Send(fd, s.from, s.to)
	}
	return true // never wait for the socket
}

// SendQueued sends q's datagrams from from up to to, as SendQueue.NextRun
// returned them: with one sendmmsg when segment is 0, else as one UDP GSO
// datagram of segment-byte segments. It returns how many the socket took
// (GSO: all or none); none if it could take none now (ErrWouldBlock).
func (s *Sender) SendQueued(q *SendQueue, from, to, segment int) (int, error) {
	s.q, s.from, s.to, s.segment = q, from, to, segment
	err := s.rc.Write(s.sendqf)
	s.q = nil
	if err == nil {
		err = s.err()
	}
	if err != nil {
		return 0, err
	}
	return s.sent, nil
}

// err is the error of the last system call.
func (s *Sender) err() error {
	switch {
	case s.errno == unix.EAGAIN:
		return ErrWouldBlock
	case s.errno != 0:
		return s.errno
	}
	return nil
}

func (s *Sender) send(fd uintptr) bool {
	_, _, s.errno = unix.RawSyscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(unsafe.SliceData(s.b))),
		uintptr(len(s.b)), unix.MSG_DONTWAIT, uintptr(unsafe.Pointer(&s.sa)), uintptr(s.salen))
	return true // never wait for the socket
}

// SendTo sends b to to.
func (s *Sender) SendTo(b []byte, to netip.AddrPort) error {
	s.b = b
	s.salen = putSockaddr(&s.sa, s.family, to)
	err := s.rc.Write(s.sendf)
	s.b = nil
	if err != nil {
		return err
	}
	return s.err()
}
