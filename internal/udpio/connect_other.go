//go:build !linux

package udpio

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
)

// Connected reports whether this platform has connected upstream sockets
// that share source ports: only Linux does.
const Connected = false

var errUnsupported = errors.New("connected upstream sockets: Linux only")

// NewUnbound is Linux-only.
func NewUnbound(int) (*net.UDPConn, error) { return nil, errUnsupported }

// Connect is Linux-only.
func Connect(syscall.Conn, netip.AddrPort, netip.AddrPort) error { return errUnsupported }

// Reconnect is Linux-only.
func Reconnect(syscall.Conn, netip.AddrPort) error { return errUnsupported }

// Replace is Linux-only.
func Replace(syscall.Conn, netip.AddrPort, netip.AddrPort, func(syscall.Conn) error) error {
	return errUnsupported
}

// Source is Linux-only.
func Source(int, netip.AddrPort) (netip.Addr, error) { return netip.Addr{}, errUnsupported }

// LocalPortRange is Linux's default range.
func LocalPortRange() (lo, hi uint16) { return 32768, 60999 }

// IsAddrInUse reports whether err says a local address and port is taken.
func IsAddrInUse(err error) bool { return errors.Is(err, syscall.EADDRINUSE) }

// IsAddrNotAvail reports whether err says a local address is not the
// host's (any more).
func IsAddrNotAvail(err error) bool { return errors.Is(err, syscall.EADDRNOTAVAIL) }
