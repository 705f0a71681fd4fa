package udpio

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"

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
	s, err := NewSocket(family)
	if err != nil {
		return nil, err
	}
	if err := reusable(s.fd, family); err != nil {
		_ = s.Close()
		return nil, err
	}
	return s, nil
}

func reusable(fd, family int) error {
	if family == unix.AF_INET6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			return os.NewSyscallError("setsockopt IPV6_V6ONLY", err)
		}
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return os.NewSyscallError("setsockopt SO_REUSEADDR", err)
	}
	return nil
}

// Connect binds conn, a socket from NewUnbound, to local and connects it to
// peer. A local port another socket holds without SO_REUSEADDR fails with
// an error that is syscall.EADDRINUSE.
func Connect(conn syscall.Conn, local, peer netip.AddrPort) error {
	return control(conn, func(fd int, family int) error {
		if err := unix.Bind(fd, sockaddr(family, local)); err != nil {
			return os.NewSyscallError("bind", err)
		}
		return connectFD(fd, family, peer)
	})
}

// Reconnect connects conn, bound and connected, to another peer, from the
// same address and port.
func Reconnect(conn syscall.Conn, peer netip.AddrPort) error {
	return control(conn, func(fd int, family int) error { return connectFD(fd, family, peer) })
}

// Replace puts a new socket, bound to local and connected to peer, in
// place of conn's, keeping conn's descriptor number: datagrams waiting in
// the old socket are lost, and an epoll set that watched the old socket
// must add the descriptor again. Options set on the old socket are not
// carried over.
func Replace(conn syscall.Conn, local, peer netip.AddrPort) error {
	return control(conn, func(old int, family int) error {
		fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return os.NewSyscallError("socket", err)
		}
		defer unix.Close(fd)
		if err := reusable(fd, family); err != nil {
			return err
		}
		if err := unix.Bind(fd, sockaddr(family, local)); err != nil {
			return os.NewSyscallError("bind", err)
		}
		if err := connectFD(fd, family, peer); err != nil {
			return err
		}
		return os.NewSyscallError("dup3", unix.Dup3(fd, old, unix.O_CLOEXEC))
	})
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
	if err := connectFD(fd, family, peer); err != nil {
		return netip.Addr{}, err
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

// control runs fn on conn's descriptor and family.
func control(conn syscall.Conn, fn func(fd, family int) error) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	family := Family(rc)
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd), family) }); err != nil {
		return err
	}
	return ferr
}

func connectFD(fd, family int, peer netip.AddrPort) error {
	return os.NewSyscallError("connect", unix.Connect(fd, sockaddr(family, peer)))
}

// sockaddr is ap for a socket of the family; an IPv4 address on an IPv6
// socket is mapped.
func sockaddr(family int, ap netip.AddrPort) unix.Sockaddr {
	if family == unix.AF_INET {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

// IsAddrInUse reports whether err says a local address and port is taken.
func IsAddrInUse(err error) bool { return errors.Is(err, syscall.EADDRINUSE) }

// IsAddrNotAvail reports whether err says a local address is not the
// host's (any more).
func IsAddrNotAvail(err error) bool { return errors.Is(err, syscall.EADDRNOTAVAIL) }
