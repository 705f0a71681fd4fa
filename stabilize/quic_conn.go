package stabilize

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
	"github.com/stabilize-lb/caddy-stabilize/internal/quicwire"
	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// quicConn is the net.PacketConn of a terminating quic.Transport. Reads
// merge the datagrams of every flow that feeds it (caddy-l4's flows and
// fastudp endpoints); writes go straight out of the listener's socket to
// any address, so a client that migrated, or whose flow ended, is still
// reached. It is never the listener socket itself, which caddy-l4 reads.
//
// On Linux quicConn is a UDP socket to quic-go (quic_conn_linux.go):
// batched reads from the queue, writes with their control messages (GSO,
// ECN), and the Don't Fragment socket option that path-MTU discovery
// needs, on every socket writes go out of. Elsewhere quic-go sees a plain
// PacketConn: one datagram per call, packets of 1280 bytes.
type quicConn struct {
	local net.Addr
	in    chan *quicPacket
	out   atomic.Pointer[quicSocket] // where writes go; see setOut

	outMu  sync.Mutex
	latest atomic.Pointer[net.UDPConn] // the listener socket of the latest datagram
	hold   *socketHold                 // udp/: a duplicate of latest's socket, or nil

	closed    chan struct{}
	closeOnce sync.Once

	deadlineMu sync.Mutex
	deadline   time.Time
	wake       chan struct{} // a new deadline was set

	queueFull   atomic.Uint64 // datagrams dropped: quic-go lagged behind
	writeErrors atomic.Uint64 // datagrams to clients lost: the send failed

	// The handler that served the transport has been cleaned up and no
	// flow of the listener has reached another since (quicTransport.park):
	// endpoints pass their clients' datagrams on to caddy-l4, so that the
	// handler of the listener claims the transport before it reads them,
	// and the held udp/ socket closes at the first datagram that is no
	// packet of an open connection (socketHold.read).
	unclaimed atomic.Bool

	fromAddr netip.AddrPort // ReadBatch's reader only: the last client read,
	addr     *net.UDPAddr   // and its address, returned again for it
}

// quicSocket is a listener socket that writes go out of.
type quicSocket struct {
	conn   *net.UDPConn
	rc     syscall.RawConn
	family int // udpio.Family
}

// newQUICSocket prepares conn for the transport's writes (quicSocketOptions).
// It fails when conn has been closed.
func newQUICSocket(conn *net.UDPConn) (*quicSocket, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	if err := quicSocketOptions(rc); err != nil {
		return nil, err
	}
	return &quicSocket{conn: conn, rc: rc, family: udpio.Family(rc)}, nil
}

// quicPacket is one client datagram waiting for the transport.
type quicPacket struct {
	buf  [fastudp.BufferSize]byte
	n    int
	from netip.AddrPort
	dst  netip.Addr // the host address it was sent to, if known (fastudp/ on an unspecified address)
}

var quicPacketPool = sync.Pool{New: func() any { return new(quicPacket) }}

// quicQueue is how many datagrams wait for quic-go; more are dropped and
// counted, so a slow transport never stalls the listener.
const quicQueue = 1024

func newQUICConn(local net.Addr, out *net.UDPConn) (*quicConn, error) {
	sock, err := newQUICSocket(out)
	if err != nil {
		return nil, err
	}
	c := &quicConn{
		local:  local,
		in:     make(chan *quicPacket, quicQueue),
		closed: make(chan struct{}),
		wake:   make(chan struct{}, 1),
	}
	c.out.Store(sock)
	return c, nil
}

// setOut makes writes go out of out, the listener socket that a client
// datagram came through. On udp/ (hold) every config has a listener socket
// of its own, which the config closes when a reload replaces it: then
// writes go on through a duplicate of that socket kept here, which also
// reads what reaches it in place of the closed listener (takeOver), until a
// datagram through the next config's socket moves them there.
func (c *quicConn) setOut(out *net.UDPConn, hold bool) {
	if c.latest.Load() == out {
		return
	}
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.latest.Load() == out || c.isClosed() {
		return
	}
	sock, err := newQUICSocket(out)
	if err != nil {
		return // closed meanwhile by its config: keep writing as before
	}
	var held *socketHold
	if hold {
		if held, err = holdSocket(out); err != nil {
			return
		}
	}
	old := c.hold
	c.hold = held
	c.latest.Store(out)
	c.out.Store(sock)
	if old != nil {
		old.release()
	}
}

// listenerGone is called when a config that fed the transport stops: if
// the listener socket that writes go out of is closed, its duplicate takes
// over now, so that clients the kernel sends to it are read even if no
// write has failed yet.
func (c *quicConn) listenerGone() {
	latest := c.latest.Load()
	if latest == nil {
		return
	}
	if rc, err := latest.SyscallConn(); err == nil && rc.Control(func(uintptr) {}) == nil {
		return // still open
	}
	c.takeOver(latest)
}

// dropHold closes s, the duplicate of a udp/ listener's socket, while the
// transport is unclaimed, so that the kernel sends its clients to the
// sockets of the configs that listen on; unless a claim has come, or a
// newer hold has replaced s, meanwhile. It reports whether it closed s.
func (c *quicConn) dropHold(s *socketHold) bool {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.hold != s || !c.unclaimed.Load() {
		return false
	}
	s.release()
	c.hold = nil
	return true
}

// takeOver is called when a write out of failed found it closed: writes
// then go through the duplicate of its socket, which starts reading in
// place of the listener. It returns the socket to write to, or nil.
func (c *quicConn) takeOver(failed *net.UDPConn) *quicSocket {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	if c.latest.Load() != failed || c.hold == nil {
		if out := c.out.Load(); out.conn != failed {
			return out
		}
		return nil
	}
	if c.out.Load().conn == failed {
		c.out.Store(c.hold.sock)
		go c.hold.read(c)
	}
	return c.hold.sock
}

// deliver queues a copy of b, a datagram from the client from, unmapped,
// to dst, one of the host's addresses, or invalid if unknown.
func (c *quicConn) deliver(b []byte, from netip.AddrPort, dst netip.Addr) {
	p := quicPacketPool.Get().(*quicPacket)
	p.n = copy(p.buf[:], b)
	p.from, p.dst = from, dst
	c.push(p)
}

// push queues p, which the reader returns to the pool.
func (c *quicConn) push(p *quicPacket) {
	select {
	case c.in <- p:
	default:
		quicPacketPool.Put(p)
		c.queueFull.Add(1)
	}
}

// ReadFrom returns the next client datagram. A read deadline interrupts
// it, as quic-go's Transport.Close requires.
func (c *quicConn) ReadFrom(b []byte) (int, net.Addr, error) {
	p, err := c.next()
	if err != nil {
		return 0, nil, err
	}
	n := copy(b, p.buf[:p.n])
	addr := net.UDPAddrFromAddrPort(p.from)
	quicPacketPool.Put(p)
	return n, addr, nil
}

// next waits for the next client datagram until the read deadline; the
// caller returns it to the pool.
func (c *quicConn) next() (*quicPacket, error) {
	for {
		c.deadlineMu.Lock()
		d := c.deadline
		c.deadlineMu.Unlock()
		var timer *time.Timer
		var timeout <-chan time.Time
		if !d.IsZero() {
			wait := time.Until(d)
			if wait <= 0 {
				return nil, os.ErrDeadlineExceeded
			}
			timer = time.NewTimer(wait)
			timeout = timer.C
		}
		select {
		case p := <-c.in:
			stopTimer(timer)
			return p, nil
		case <-c.wake:
		case <-timeout:
		case <-c.closed:
			stopTimer(timer)
			return nil, net.ErrClosed
		}
		stopTimer(timer)
	}
}

func stopTimer(t *time.Timer) {
	if t != nil {
		t.Stop()
	}
}

// WriteTo sends b to addr out of the listener's socket. A failed send is
// a lost datagram, counted: an error would close every connection of the
// transport, and on a udp/ listener the socket is replaced on reloads
// (the next flow brings the new one).
func (c *quicConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		c.writeErrors.Add(1)
		return len(b), nil
	}
	ap := ua.AddrPort()
	to := netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	out := c.out.Load()
	_, err := out.conn.WriteToUDPAddrPort(b, to)
	if errors.Is(err, net.ErrClosed) {
		if out = c.takeOver(out.conn); out != nil {
			_, err = out.conn.WriteToUDPAddrPort(b, to)
		}
	}
	if err != nil {
		c.writeErrors.Add(1)
	}
	return len(b), nil
}

// Close ends reads; the listener's socket stays open.
func (c *quicConn) Close() error {
	c.closeOnce.Do(func() {
		c.outMu.Lock()
		close(c.closed)
		if c.hold != nil {
			c.hold.release()
			c.hold = nil
		}
		c.outMu.Unlock()
	})
	return nil
}

func (c *quicConn) isClosed() bool {
	select {
	case <-c.closed:
		return true
	default:
		return false
	}
}

// LocalAddr is the listener's address.
func (c *quicConn) LocalAddr() net.Addr { return c.local }

// SetDeadline sets the read deadline; writes never wait.
func (c *quicConn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

// SetReadDeadline interrupts a waiting ReadFrom at t.
func (c *quicConn) SetReadDeadline(t time.Time) error {
	c.deadlineMu.Lock()
	c.deadline = t
	c.deadlineMu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return nil
}

// SetWriteDeadline is a no-op: the listener's socket is shared.
func (c *quicConn) SetWriteDeadline(time.Time) error { return nil }

// SetReadBuffer is a no-op: the listener's socket is sized by its owner,
// and by quic-go through SyscallConn where it has one.
func (c *quicConn) SetReadBuffer(int) error { return nil }

// SetWriteBuffer is a no-op; see SetReadBuffer.
func (c *quicConn) SetWriteBuffer(int) error { return nil }

// socketHold is a duplicate of a udp/ listener's socket, which keeps the
// socket open once its config has closed it.
type socketHold struct {
	sock *quicSocket
}

// read delivers the datagrams that reach the held socket, which its
// listener no longer reads, until release. While the transport is
// unclaimed, the first datagram that is no packet of a live connection
// (quicOfLive) closes the hold and is dropped: the kernel then sends every
// client to the new config's socket, whose route claims the transport or
// balances them, and the client resends.
func (s *socketHold) read(c *quicConn) {
	buf := make([]byte, fastudp.BufferSize)
	for {
		n, from, err := s.sock.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		if c.unclaimed.Load() && !quicOfLive(buf[:n]) && c.dropHold(s) {
			return
		}
		c.deliver(buf[:n], netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), netip.Addr{})
	}
}

// quicOfLive reports whether b may be a packet of a connection already
// open: a short header, or a Handshake packet; not an Initial, which opens
// a connection, nor anything that is not QUIC.
func quicOfLive(b []byte) bool {
	if !quicwire.IsLongHeader(b) {
		return len(b) > 0 && b[0]&0x40 != 0 // the fixed bit
	}
	hdr, err := quicwire.ParseLong(b)
	if err != nil {
		return false
	}
	typ, err := hdr.Type()
	return err == nil && typ == quicwire.PacketTypeHandshake
}

// release closes the duplicate, and so the socket if its listener has.
func (s *socketHold) release() { _ = s.sock.conn.Close() }

// quicEndpoint feeds a fastudp client's datagrams straight to a
// terminating transport, bypassing caddy-l4 (fastudp.Endpoint).
type quicEndpoint struct {
	conn       *quicConn
	sock       *fastudp.Socket
	client     netip.AddrPort
	idle       time.Duration
	lastActive atomic.Int64
}

// Deliver queues a client datagram for the transport; while no handler
// has claimed it, it passes the datagram on to caddy-l4 instead.
func (e *quicEndpoint) Deliver(d fastudp.Datagram, now int64) {
	e.lastActive.Store(now)
	if d.Truncated {
		return // not QUIC: QUIC datagrams are far shorter
	}
	if e.conn.unclaimed.Load() {
		e.sock.PassOn(e.client, e, d)
		return
	}
	e.conn.deliver(d.B, e.client, d.Dst)
}

// Expired says the client has been idle for the listener's idle timeout,
// or the transport has closed.
func (e *quicEndpoint) Expired(now int64) bool {
	return now-e.lastActive.Load() > int64(e.idle) || e.conn.isClosed()
}

// Close unregisters the endpoint.
func (e *quicEndpoint) Close() { e.sock.Unregister(e.client, e) }

// Interface guards
var (
	_ net.PacketConn   = (*quicConn)(nil)
	_ fastudp.Endpoint = (*quicEndpoint)(nil)
)
