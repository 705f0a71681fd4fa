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
// goroutine at a time may use a Sender; it allocates nothing per send. A
// Socket's sends make the system call directly, with what they need on the
// stack, so that a flow's send touches no memory but the Sender's two words
// and the Socket's.
type Sender struct {
	sock   *Socket    // or
	raw    *rawSender // for any other syscall.Conn
	family int
}

// rawSender sends through a RawConn.
type rawSender struct {
	rc    syscall.RawConn
	b     []byte
	sa    unix.RawSockaddrInet6
	salen uint32
	errno syscall.Errno
	sendf func(fd uintptr) bool // send, bound once

	q                       *SendQueue
	from, to, sent, segment int
	sendqf                  func(fd uintptr) bool // sendQueued, bound once
}

// NewSender returns a Sender for conn.
func NewSender(conn syscall.Conn) (*Sender, error) {
	s := new(Sender)
	return s, s.Init(conn)
}

// Init sets s up to send on conn, for a Sender kept by value.
func (s *Sender) Init(conn syscall.Conn) error {
	if sock, ok := conn.(*Socket); ok {
		*s = Sender{sock: sock, family: sock.Family()}
		return nil
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	r := &rawSender{rc: rc}
	r.sendf = r.send
	r.sendqf = r.sendQueued
	*s = Sender{raw: r, family: Family(rc)}
	return nil
}

// Warm loads the Socket's state into the CPU's cache, ahead of a send.
func (s *Sender) Warm() {
	if s.sock != nil {
		s.sock.refs.Load()
	}
}

// Family is the socket's address family, for SendQueue.Add.
func (s *Sender) Family() int { return s.family }

// SendTo sends b to to, or to the socket's connected peer if to is
// invalid.
func (s *Sender) SendTo(b []byte, to netip.AddrPort) error {
	if s.sock == nil {
		return s.raw.sendTo(b, s.family, to)
	}
	var sa unix.RawSockaddrInet6
	salen := putSockaddr(&sa, s.family, to)
	if !s.sock.acquire() {
		return net.ErrClosed
	}
	errno := sendto(uintptr(s.sock.fd), b, &sa, salen)
	s.sock.release()
	return errnoErr(errno)
}

// sendto sends b from fd to sa, or to the connected peer when salen is 0.
func sendto(fd uintptr, b []byte, sa *unix.RawSockaddrInet6, salen uint32) syscall.Errno {
	if salen == 0 {
		sa = nil // with a name of length 0, sendto fails
	}
	_, _, errno := unix.RawSyscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(unsafe.SliceData(b))),
		uintptr(len(b)), unix.MSG_DONTWAIT, uintptr(unsafe.Pointer(sa)), uintptr(salen))
	return errno
}

// SendQueued sends q's datagrams from from up to to, as SendQueue.NextRun
// returned them: with one sendmmsg when segment is 0, else as one UDP GSO
// datagram of segment-byte segments. It returns how many the socket took
// (GSO: all or none); none if it could take none now (ErrWouldBlock).
func (s *Sender) SendQueued(q *SendQueue, from, to, segment int) (int, error) {
	if s.sock == nil {
		return s.raw.sendQueuedTo(q, from, to, segment)
	}
	if !s.sock.acquire() {
		return 0, net.ErrClosed
	}
	sent, errno := q.send(uintptr(s.sock.fd), from, to, segment)
	s.sock.release()
	if err := errnoErr(errno); err != nil {
		return 0, err
	}
	return sent, nil
}

// send sends the queued datagrams from from up to to on fd, as SendQueued.
func (q *SendQueue) send(fd uintptr, from, to, segment int) (int, syscall.Errno) {
	if segment > 0 {
		return to - from, q.SendGSO(fd, from, to, segment)
	}
	return q.Send(fd, from, to)
}

// errnoErr is the error of a system call's errno.
func errnoErr(errno syscall.Errno) error {
	switch {
	case errno == unix.EAGAIN:
		return ErrWouldBlock
	case errno != 0:
		return errno
	}
	return nil
}

func (r *rawSender) sendTo(b []byte, family int, to netip.AddrPort) error {
	r.b = b
	r.salen = putSockaddr(&r.sa, family, to)
	err := r.rc.Write(r.sendf)
	r.b = nil
	if err != nil {
		return err
	}
	return errnoErr(r.errno)
}

func (r *rawSender) send(fd uintptr) bool {
	r.errno = sendto(fd, r.b, &r.sa, r.salen)
	return true // never wait for the socket
}

func (r *rawSender) sendQueuedTo(q *SendQueue, from, to, segment int) (int, error) {
	r.q, r.from, r.to, r.segment = q, from, to, segment
	err := r.rc.Write(r.sendqf)
	r.q = nil
	if err == nil {
		err = errnoErr(r.errno)
	}
	if err != nil {
		return 0, err
	}
	return r.sent, nil
}

func (r *rawSender) sendQueued(fd uintptr) bool {
	r.sent, r.errno = r.q.send(fd, r.from, r.to, r.segment)
	return true // never wait for the socket
}
