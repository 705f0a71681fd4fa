//go:build !linux

package udpio

import (
	"net"
	"net/netip"
)

// Batch reads one datagram at a time where recvmmsg is not available.
type Batch struct {
	conn  *net.UDPConn
	buf   []byte
	n     int
	src   netip.AddrPort
	trunc bool
}

// NewBatch returns a reader of datagrams of up to bufSize bytes; a longer
// datagram is reported truncated.
func NewBatch(conn *net.UDPConn, _ int, bufSize int) (*Batch, error) {
	return &Batch{conn: conn, buf: make([]byte, bufSize+1)}, nil
}

// NewGROBatch is NewBatch: UDP GRO is Linux-only.
func NewGROBatch(conn *net.UDPConn, size, bufSize int) (*Batch, error) {
	return NewBatch(conn, size, bufSize)
}

// GRO reports that UDP GRO is off: it is Linux-only.
func (b *Batch) GRO() bool { return false }

// Close does nothing: the buffer is the Go heap's.
func (b *Batch) Close() {}

// Read waits for a datagram.
func (b *Batch) Read() (int, error) {
	n, src, err := b.conn.ReadFromUDPAddrPort(b.buf)
	if err != nil {
		return 0, err
	}
	b.n, b.trunc = min(n, len(b.buf)-1), n == len(b.buf)
	b.src = Unmap(src)
	return 1, nil
}

// Coalesced is 0: without UDP GRO, no datagram comes coalesced.
func (b *Batch) Coalesced() int { return 0 }

// Message returns the datagram of the last Read.
func (b *Batch) Message(int) (netip.AddrPort, []byte, bool) {
	return b.src, b.buf[:b.n], b.trunc
}

// Dst is invalid: the destination address of a datagram is read with
// IP_PKTINFO on Linux only.
func (b *Batch) Dst(int) netip.Addr { return netip.Addr{} }
