//go:build !linux

package udpio

import (
	"net"
	"net/netip"
)

// Sender sends datagrams from one socket. Where non-blocking sends are not
// implemented it writes through package net, which waits while the socket's
// buffer is full.
type Sender struct {
	conn *net.UDPConn
}

// NewSender returns a Sender for conn.
func NewSender(conn *net.UDPConn) *Sender { return &Sender{conn: conn} }

// Init sets s up to send on conn, for a Sender kept by value.
func (s *Sender) Init(conn *net.UDPConn) { s.conn = conn }

// Warm does nothing here.
func (*Sender) Warm() {}

// SendTo sends b to to.
func (s *Sender) SendTo(b []byte, to netip.AddrPort) error {
	_, err := s.conn.WriteToUDPAddrPort(b, to)
	return err
}
