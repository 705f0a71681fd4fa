package udpio

import (
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Socket is a UDP socket that Go's netpoller does not watch: the
// upstream-facing socket of a flow, which only the reply reactor's own
// epoll set waits on and which every call reads and writes without
// blocking. A socket in the netpoller costs, for every datagram it
// receives, an event in the runtime's epoll set and a poll of the socket
// when the runtime collects it, and each RawConn.Read or Write a reset of
// its poll descriptor, all on cold memory when there are many flows.
//
// Its RawConn never waits: Read and Write call their function once. As
// net.UDPConn's, every call holds the descriptor: Close during a call
// closes it when the call returns, so a call never reaches a descriptor
// number that the kernel has handed to another socket. After Close, calls
// report net.ErrClosed.
type Socket struct {
	refs      atomic.Uint64 // calls in progress, plus socketClosing once Close began
	fd        int
	family    int
	closeOnce sync.Once
	closeErr  error
}

// socketClosing is the refs bit that Close sets.
const socketClosing = 1 << 63

// acquire holds the descriptor for a call, unless Close began.
func (s *Socket) acquire() bool {
	if s.refs.Add(1)&socketClosing != 0 {
		s.release()
		return false
	}
	return true
}

// release lets the descriptor go; the last call after Close closes it.
func (s *Socket) release() {
	if s.refs.Add(^uint64(0)) == socketClosing {
		s.closeFD()
	}
}

func (s *Socket) closeFD() {
	s.closeOnce.Do(func() { s.closeErr = os.NewSyscallError("close", unix.Close(s.fd)) })
}

// NewSocket returns a UDP socket of the family (AF_INET or AF_INET6,
// dual-stack), not bound yet, outside the netpoller.
func NewSocket(family int) (*Socket, error) {
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	if family == unix.AF_INET6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			_ = unix.Close(fd)
			return nil, os.NewSyscallError("setsockopt IPV6_V6ONLY", err)
		}
	}
	return &Socket{fd: fd, family: family}, nil
}

// NewBound returns a UDP socket bound to local, a port the kernel picks on
// local's address (any address if local's is invalid), which no other
// socket shares; outside the netpoller.
func NewBound(family int, local netip.Addr) (*Socket, error) {
	s, err := NewSocket(family)
	if err != nil {
		return nil, err
	}
	if !local.IsValid() {
		local = netip.IPv4Unspecified()
		if family == unix.AF_INET6 {
			local = netip.IPv6Unspecified()
		}
	}
	if err := sockaddrCall(unix.SYS_BIND, s.fd, family, netip.AddrPortFrom(local, 0)); err != nil {
		_ = s.Close()
		return nil, os.NewSyscallError("bind", err)
	}
	return s, nil
}

// FD is the socket's descriptor, for a caller that orders its use with
// Close itself (the reply reactor).
func (s *Socket) FD() int { return s.fd }

// Family is the socket's address family.
func (s *Socket) Family() int { return s.family }

// Close closes the socket, at once or when the call in progress returns.
func (s *Socket) Close() error {
	for {
		v := s.refs.Load()
		if v&socketClosing != 0 {
			return net.ErrClosed
		}
		if s.refs.CompareAndSwap(v, v|socketClosing) {
			if v == 0 {
				s.closeFD()
				return s.closeErr
			}
			return nil
		}
	}
}

// SyscallConn returns the socket's RawConn (syscall.Conn).
func (s *Socket) SyscallConn() (syscall.RawConn, error) { return (*socketRC)(s), nil }

// SetReadBuffer sets SO_RCVBUF, as net.UDPConn's does.
func (s *Socket) SetReadBuffer(bytes int) error {
	return s.setsockopt("SO_RCVBUF", unix.SO_RCVBUF, bytes)
}

// SetWriteBuffer sets SO_SNDBUF, as net.UDPConn's does.
func (s *Socket) SetWriteBuffer(bytes int) error {
	return s.setsockopt("SO_SNDBUF", unix.SO_SNDBUF, bytes)
}

// setsockopt sets the SOL_SOCKET option opt, named name, to v.
func (s *Socket) setsockopt(name string, opt, v int) error {
	var err error
	if cerr := (*socketRC)(s).Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, v) }); cerr != nil {
		return cerr
	}
	return os.NewSyscallError("setsockopt "+name, err)
}

// LocalAddr is the socket's address, unmapped; invalid before it is bound.
func (s *Socket) LocalAddr() netip.AddrPort {
	var sa unix.Sockaddr
	err := (*socketRC)(s).Control(func(fd uintptr) { sa, _ = unix.Getsockname(int(fd)) })
	if err != nil {
		return netip.AddrPort{}
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return Unmap(netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)))
	}
	return netip.AddrPort{}
}

// socketRC is a Socket's syscall.RawConn.
type socketRC Socket

// Control calls f with the descriptor held: Close waits for it.
func (rc *socketRC) Control(f func(fd uintptr)) error {
	s := (*Socket)(rc)
	if !s.acquire() {
		return net.ErrClosed
	}
	f(uintptr(s.fd))
	s.release()
	return nil
}

// Read and Write call f once: the socket is non-blocking and never waits
// to be ready.
func (rc *socketRC) Read(f func(fd uintptr) bool) error {
	return rc.Control(func(fd uintptr) { f(fd) })
}

func (rc *socketRC) Write(f func(fd uintptr) bool) error {
	return rc.Control(func(fd uintptr) { f(fd) })
}

// Interface guards
var (
	_ syscall.Conn    = (*Socket)(nil)
	_ syscall.RawConn = (*socketRC)(nil)
)
