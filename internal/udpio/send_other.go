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
func NewSender(conn *net.UDPConn) (*Sender, error) { return &Sender{conn: conn}, nil }

// SendTo sends b to to.
func (s *Sender) SendTo(b []byte, to netip.AddrPort) error {
	_, err := s.conn.WriteToUDPAddrPort(b, to)
	return err
}
