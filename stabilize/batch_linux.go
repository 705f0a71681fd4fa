package stabilize

import (
	"encoding/binary"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmsghdr is struct mmsghdr for recvmmsg(2) and sendmmsg(2).
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
	_   [4]byte
}

// mmsgs is an array of messages for recvmmsg and sendmmsg, with their
// buffers and addresses. It is allocation-free after newMmsgs.
type mmsgs struct {
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6
	bufs  [][]byte
}

func newMmsgs(size, bufSize int) *mmsgs {
	m := &mmsgs{
		hdrs:  make([]mmsghdr, size),
		iovs:  make([]unix.Iovec, size),
		names: make([]unix.RawSockaddrInet6, size),
		bufs:  make([][]byte, size),
	}
	for i := range size {
		m.bufs[i] = make([]byte, bufSize)
		m.iovs[i].Base = &m.bufs[i][0]
		m.iovs[i].SetLen(bufSize)
		m.hdrs[i].hdr.Name = (*byte)(unsafe.Pointer(&m.names[i]))
		m.hdrs[i].hdr.Iov = &m.iovs[i]
		m.hdrs[i].hdr.Iovlen = 1
	}
	return m
}

// recv reads datagrams from fd, without blocking, into messages from on.
func (m *mmsgs) recv(fd uintptr, from int) (int, syscall.Errno) {
	for i := from; i < len(m.hdrs); i++ {
		m.hdrs[i].hdr.Namelen = unix.SizeofSockaddrInet6
		m.hdrs[i].hdr.Flags = 0
	}
	n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&m.hdrs[from])),
		uintptr(len(m.hdrs)-from), unix.MSG_DONTWAIT, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), 0
}

// message returns datagram i: its source, its bytes and whether it was cut
// short.
func (m *mmsgs) message(i int) (netip.AddrPort, []byte, bool) {
	h := &m.hdrs[i]
	return sockaddrToAddrPort(&m.names[i]), m.bufs[i][:h.len], h.hdr.Flags&unix.MSG_TRUNC != 0
}

func sockaddrToAddrPort(sa *unix.RawSockaddrInet6) netip.AddrPort {
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port)
	case unix.AF_INET6:
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
	}
	return netip.AddrPort{}
}

// putSockaddr stores ap in sa for a socket of the given family, and returns
// the address length.
func putSockaddr(sa *unix.RawSockaddrInet6, family int, ap netip.AddrPort) uint32 {
	if family == unix.AF_INET {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		sa4.Family = unix.AF_INET
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:], ap.Port())
		sa4.Addr = ap.Addr().As4()
		return unix.SizeofSockaddrInet4
	}
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: ap.Addr().As16()}
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], ap.Port())
	return unix.SizeofSockaddrInet6
}

// batch reads up to a batch of datagrams from a socket with one recvmmsg.
type batch struct {
	rc    syscall.RawConn
	m     *mmsgs
	recvf func(fd uintptr) bool // b.recv, bound once
	n     int
	errno syscall.Errno
}

func newBatch(conn *net.UDPConn, size, bufSize int) (*batch, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	b := &batch{rc: rc, m: newMmsgs(size, bufSize)}
	b.recvf = b.recv
	return b, nil
}

func (b *batch) recv(fd uintptr) bool {
	b.n, b.errno = b.m.recv(fd, 0)
	return b.errno != unix.EAGAIN && b.errno != unix.EINTR // else wait until readable
}

// read waits for datagrams and returns how many were read.
func (b *batch) read() (int, error) {
	if err := b.rc.Read(b.recvf); err != nil {
		return 0, err
	}
	if b.errno != 0 {
		return 0, b.errno
	}
	return b.n, nil
}

// message returns datagram i of the last read.
func (b *batch) message(i int) (netip.AddrPort, []byte, bool) { return b.m.message(i) }

// socketFamily is the address family of a socket: AF_INET or AF_INET6.
func socketFamily(rc syscall.RawConn) int {
	family := unix.AF_INET6
	_ = rc.Control(func(fd uintptr) {
		if d, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN); err == nil {
			family = d
		}
	})
	return family
}

// growBuffers raises a socket's receive and send buffers to size, past the
// system's maximum (net.core.rmem_max) where the process may, as quic-go
// does for its sockets.
func growBuffers(rc syscall.RawConn, size int) {
	_ = rc.Control(func(fd uintptr) {
		for _, opt := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[0], size) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[1], size)
			}
		}
	})
}
