// Package udpio is the platform code of stabilize's UDP sockets, split by
// mechanism as quic-go splits its sys_conn files: batched receive and send
// (recvmmsg, with UDP GRO where asked; sendmmsg), non-blocking sends, the
// error queue that reports ICMP errors, socket options, and upstream-facing
// sockets outside Go's netpoller (Socket). On Linux every call is
// non-blocking and allocation-free; elsewhere it falls back to one datagram
// per call through package net.
package udpio

import (
	"errors"
	"net/netip"
	"syscall"
)

// Conn is a socket whose buffers and options the caller sets up: a
// *net.UDPConn, or on Linux a Socket.
type Conn interface {
	syscall.Conn
	SetReadBuffer(bytes int) error
	SetWriteBuffer(bytes int) error
}

// ErrWouldBlock reports a send that the socket's buffer could not take now.
// The datagram is dropped, never waited for.
var ErrWouldBlock = errors.New("udpio: socket send buffer full")

// Unmap returns ap with an IPv4-mapped IPv6 address as plain IPv4, the one
// form stabilize keys clients and upstreams by.
func Unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
