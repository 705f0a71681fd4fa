package udpio

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Connected reports whether this platform has connected upstream sockets
// that share source ports (NewUnbound, Connect, Reconnect, Replace).
const Connected = true

// NewUnbound returns a UDP socket of the family (AF_INET or AF_INET6,
// dual-stack), not bound yet, outside the netpoller (Socket). SO_REUSEADDR
// lets it share a source port with other sockets connected to other peers:
// the kernel delivers each datagram to the socket connected to its source,
// so the caller must never connect two sockets to one peer from one
// address and port.
func NewUnbound(family int) (*Socket, error) {
	s, err := NewSocket(family) // dual-stack already
	if err != nil {
		return nil, err
	}
	if err := reuseAddr(s.fd); err != nil {
		_ = s.Close()
		return nil, err
	}
	return s, nil
}

func reuseAddr(fd int) error {
	return os.NewSyscallError("setsockopt SO_REUSEADDR", unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1))
}

// Connect binds s, a socket from NewUnbound, to local and connects it to
// peer. A local port another socket holds without SO_REUSEADDR fails with
// an error that is syscall.EADDRINUSE.
func Connect(s *Socket, local, peer netip.AddrPort) error {
	if !s.acquire() {
		return net.ErrClosed
	}
	defer s.release()
	if err := sockaddrCall(unix.SYS_BIND, s.fd, s.family, local); err != nil {
		return os.NewSyscallError("bind", err)
	}
	return os.NewSyscallError("connect", sockaddrCall(unix.SYS_CONNECT, s.fd, s.family, peer))
}

// Reconnect connects s, bound and connected, to another peer, from the
// same address and port.
func Reconnect(s *Socket, peer netip.AddrPort) error {
	if !s.acquire() {
		return net.ErrClosed
	}
	defer s.release()
	return os.NewSyscallError("connect", sockaddrCall(unix.SYS_CONNECT, s.fd, s.family, peer))
}

// Replace puts a new socket, bound to local and connected to peer, in
// place of s's, keeping s's descriptor number: datagrams waiting in the
// old socket are lost, and an epoll set that watched the old socket must
// add the descriptor again. Options set on the old socket are not carried
// over: setup, if not nil, sets the new socket up before it takes the old
// one's place, so that s never stands for a socket set up halfway.
func Replace(s *Socket, local, peer netip.AddrPort, setup func(*Socket) error) error {
	if !s.acquire() {
		return net.ErrClosed
	}
	defer s.release()
	n, err := NewUnbound(s.family)
	if err != nil {
		return err
	}
	defer n.Close()
	if err := Connect(n, local, peer); err != nil {
		return err
	}
	if setup != nil {
		if err := setup(n); err != nil {
			return err
		}
	}
	return os.NewSyscallError("dup3", unix.Dup3(n.fd, s.fd, unix.O_CLOEXEC))
}

// sockaddrCall makes the system call trap (bind or connect) on fd with the
// address ap, for a socket of the family, without allocating.
func sockaddrCall(trap uintptr, fd, family int, ap netip.AddrPort) error {
	if family == unix.AF_INET {
		ap = Unmap(ap)
	}
	var sa unix.RawSockaddrInet6
	n := putSockaddr(&sa, family, ap)
	if _, _, errno := unix.Syscall(trap, uintptr(fd), uintptr(unsafe.Pointer(&sa)), uintptr(n)); errno != 0 {
		return errno
	}
	return nil
}

// Source returns the local address the kernel's routing picks for sending
// to peer from a socket of the family.
func Source(family int, peer netip.AddrPort) (netip.Addr, error) {
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return netip.Addr{}, os.NewSyscallError("socket", err)
	}
	defer unix.Close(fd)
	if family == unix.AF_INET6 {
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
	}
	if err := sockaddrCall(unix.SYS_CONNECT, fd, family, peer); err != nil {
		return netip.Addr{}, os.NewSyscallError("connect", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return netip.Addr{}, os.NewSyscallError("getsockname", err)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrFrom4(sa.Addr), nil
	case *unix.SockaddrInet6:
		return netip.AddrFrom16(sa.Addr).Unmap(), nil
	}
	return netip.Addr{}, fmt.Errorf("getsockname: unexpected address %T", sa)
}

// LocalPortRange is the system's range of ephemeral ports, the ports the
// caller picks source ports from (net.ipv4.ip_local_port_range).
func LocalPortRange() (lo, hi uint16) {
	lo, hi = 32768, 60999 // Linux's default
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return lo, hi
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return lo, hi
	}
	l, err1 := strconv.ParseUint(f[0], 10, 16)
	h, err2 := strconv.ParseUint(f[1], 10, 16)
	if err1 != nil || err2 != nil || l == 0 || l > h {
		return lo, hi
	}
	return uint16(l), uint16(h)
}

// IsAddrInUse reports whether err says a local address and port is taken.
func IsAddrInUse(err error) bool { return errors.Is(err, syscall.EADDRINUSE) }

// IsAddrNotAvail reports whether err says a local address is not the
// host's (any more).
func IsAddrNotAvail(err error) bool { return errors.Is(err, syscall.EADDRNOTAVAIL) }
