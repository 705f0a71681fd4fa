//go:build !linux

package stabilize

import (
	"net"
	"net/netip"
	"syscall"
)

// batch reads one datagram at a time where recvmmsg is not available.
type batch struct {
	conn  *net.UDPConn
	buf   []byte
	n     int
	src   netip.AddrPort
	trunc bool
}

func newBatch(conn *net.UDPConn, _ int, bufSize int) (*batch, error) {
	return &batch{conn: conn, buf: make([]byte, bufSize+1)}, nil
}

func (b *batch) read() (int, error) {
	n, src, err := b.conn.ReadFromUDPAddrPort(b.buf)
	if err != nil {
		return 0, err
	}
	b.n, b.trunc = min(n, len(b.buf)-1), n == len(b.buf)
	b.src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	return 1, nil
}

func (b *batch) message(int) (netip.AddrPort, []byte, bool) {
	return b.src, b.buf[:b.n], b.trunc
}

// socketFamily is only needed for sendmmsg, which is Linux-only.
func socketFamily(syscall.RawConn) int { return 0 }

// growBuffers asks for larger socket buffers.
func growBuffers(rc syscall.RawConn, size int) {
	_ = rc.Control(func(fd uintptr) {
		_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, size)
		_ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, size)
	})
}
