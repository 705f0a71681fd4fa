// Package udpecho is a UDP echo server that names itself in every reply, so
// that a client behind a load balancer can tell which upstream answered.
//
// # Wire format
//
// For each request datagram the server sends exactly one reply datagram:
//
//	reply = identity + "|" + request
//
// The identity is the server's listen address as net.UDPAddr.String prints it,
// e.g. "127.0.0.1:6001" or "[::1]:6001"; it never contains '|'. The request is
// echoed byte for byte, so a probe "PING" gets "127.0.0.1:6001|PING". Split
// takes a reply apart without allocating.
//
// The prefix makes a reply longer than its request. A request that leaves no
// room for it (over 65507 bytes minus the prefix on IPv4) gets no reply; that
// is the sender's concern. Such a request still counts as received.
//
// # Failure cases
//
// A server can be made silent with SetSilent: it keeps receiving and counting
// but never replies, like an upstream that hangs. To stop an upstream, Close
// it; to restart it, Start a new server on the same address.
package udpecho

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"syscall"
)

// Sep separates the identity from the echoed request in a reply.
const Sep = '|'

// MaxDatagram is the largest UDP payload the server reads.
const MaxDatagram = 65535

// Server is a running echo server. Its methods are safe for concurrent use.
type Server struct {
	conn     *net.UDPConn
	addr     *net.UDPAddr
	received atomic.Uint64
	replied  atomic.Uint64
	silent   atomic.Bool
	done     chan struct{}
}

// Start listens on the UDP address addr (host:port; port 0 picks a free one)
// and serves until Close.
func Start(addr string) (*Server, error) {
	laddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("udpecho: resolve %q: %w", addr, err)
	}
	conn, err := net.ListenUDP("udp", laddr)
	if err != nil {
		return nil, fmt.Errorf("udpecho: listen: %w", err)
	}
	s := &Server{
		conn: conn,
		addr: conn.LocalAddr().(*net.UDPAddr),
		done: make(chan struct{}),
	}
	go s.serve()
	return s, nil
}

// serve answers datagrams until the socket is closed. The request is read
// right after the identity prefix in one buffer, so a reply costs no copy.
func (s *Server) serve() {
	defer close(s.done)
	prefix := s.addr.String() + string(Sep)
	buf := make([]byte, len(prefix)+MaxDatagram)
	copy(buf, prefix)
	for {
		n, from, err := s.conn.ReadFromUDPAddrPort(buf[len(prefix):])
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue // a transient error concerns one datagram, not the server
		}
		s.received.Add(1)
		if s.silent.Load() {
			continue
		}
		if _, err := s.conn.WriteToUDPAddrPort(buf[:len(prefix)+n], from); err == nil {
			s.replied.Add(1)
		}
	}
}

// Addr returns the address the server listens on.
func (s *Server) Addr() *net.UDPAddr { return s.addr }

// SyscallConn returns the server's socket, for socket options such as
// larger buffers (a load test with many clients).
func (s *Server) SyscallConn() (syscall.RawConn, error) { return s.conn.SyscallConn() }

// Name returns the identity the server puts in its replies: Addr().String().
func (s *Server) Name() string { return s.addr.String() }

// Received returns how many datagrams the server has read, silent or not.
func (s *Server) Received() uint64 { return s.received.Load() }

// Replied returns how many replies the server has sent.
func (s *Server) Replied() uint64 { return s.replied.Load() }

// SetSilent makes the server stop (true) or resume (false) replying. A silent
// server still receives and counts datagrams.
func (s *Server) SetSilent(silent bool) { s.silent.Store(silent) }

// Close stops the server and frees its port. When Close returns, the counters
// are final. Closing twice returns the socket's error.
func (s *Server) Close() error {
	err := s.conn.Close()
	<-s.done
	return err
}

// Split takes a reply apart into the identity of the server that sent it and
// the echoed request. Both slices alias reply. ok is false when reply has no
// separator.
func Split(reply []byte) (identity, payload []byte, ok bool) {
	return bytes.Cut(reply, []byte{Sep})
}
