package udpio

import (
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// Batch reads up to a batch of datagrams from a socket with one recvmmsg.
type Batch struct {
	rc    syscall.RawConn
	m     *Msgs
	recvf func(fd uintptr) bool // b.recv, bound once
	n     int
	errno syscall.Errno
}

// NewBatch returns a reader of up to size datagrams of up to bufSize bytes
// per call; a longer datagram is reported truncated.
func NewBatch(conn *net.UDPConn, size, bufSize int) (*Batch, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	b := &Batch{rc: rc, m: NewMsgs(size, bufSize)}
	b.recvf = b.recv
	return b, nil
}

func (b *Batch) recv(fd uintptr) bool {
	b.n, b.errno = b.m.Recv(fd, 0)
	return b.errno != unix.EAGAIN && b.errno != unix.EINTR // else wait until readable
}

// Read waits for datagrams and returns how many were read.
func (b *Batch) Read() (int, error) {
	if err := b.rc.Read(b.recvf); err != nil {
		return 0, err
	}
	if b.errno != 0 {
		return 0, b.errno
	}
	return b.n, nil
}

// Message returns datagram i of the last Read: its source, unmapped, its
// bytes and whether it was cut short.
func (b *Batch) Message(i int) (netip.AddrPort, []byte, bool) { return b.m.Message(i) }
