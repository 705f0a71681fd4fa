package udpio

import (
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Sender sends datagrams from one Socket without ever blocking: a
// datagram the socket's buffer cannot take is dropped with ErrWouldBlock.
// One goroutine at a time may use a Sender; it allocates nothing per send.
// Sends make the system call directly, with what they need on the stack,
// so that a flow's send touches no memory but the Sender's two words and
// the Socket's.
type Sender struct {
	sock   *Socket
	family int
}

// NewSender returns a Sender for sock.
func NewSender(sock *Socket) *Sender {
	s := new(Sender)
	s.Init(sock)
	return s
}

// Init sets s up to send on sock, for a Sender kept by value.
func (s *Sender) Init(sock *Socket) {
	*s = Sender{sock: sock, family: sock.Family()}
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
