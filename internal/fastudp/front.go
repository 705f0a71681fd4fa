package fastudp

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// Front is one config's view of a Socket: the net.PacketConn that caddy-l4
// reads the datagrams of unregistered clients from.
type Front struct {
	s       *Socket
	readers int // the socket's readers that the front's config asked for
	// The datagrams of unregistered clients waiting for caddy-l4, oldest
	// first: queue[head:], at most newClientQueue. The queue grows with a
	// burst and gives its room back once empty, so that an idle front (a
	// port range has one per port) costs little.
	qmu   sync.Mutex
	queue []*queued
	head  int
	ready chan struct{} // a datagram was queued; capacity 1
	// queuedBytes is the size of the buffers of the datagrams in queue
	// and on their way in, within newClientBytes.
	queuedBytes atomic.Int64
	closed      chan struct{}
	closeOnce   sync.Once
	logger      *zap.Logger // for the front's warnings; nil: none
	warnedSrc   atomic.Bool // a source no longer local; see WriteTo
}

// idleQueue is the most room for queued datagrams that an empty queue
// keeps.
const idleQueue = 256

// SetLogger makes l the logger of the front's warnings. Call it before the
// front is used.
func (f *Front) SetLogger(l *zap.Logger) { f.logger = l }

// Socket is the socket behind the front.
func (f *Front) Socket() *Socket { return f.s }

// ReadFrom returns the next datagram of an unregistered client. Several
// goroutines may read at once.
func (f *Front) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		if q, more := f.pop(); q != nil {
			if more { // pass the one signal on to another reader
				f.signal()
			}
			n, addr := copy(b, q.b), newUDPAddr(q.src)
			f.unqueue(q)
			return n, addr, nil
		}
		select {
		case <-f.ready:
		case <-f.closed:
			return 0, nil, net.ErrClosed
		}
	}
}

// pop takes the oldest queued datagram off the queue, or returns nil, and
// reports whether more are queued.
func (f *Front) pop() (*queued, bool) {
	f.qmu.Lock()
	defer f.qmu.Unlock()
	if f.head == len(f.queue) {
		return nil, false
	}
	q := f.queue[f.head]
	f.queue[f.head] = nil
	if f.head++; f.head == len(f.queue) {
		f.queue, f.head = f.queue[:0], 0
		if cap(f.queue) > idleQueue {
			f.queue = nil // a burst's room
		}
	}
	return q, f.head < len(f.queue)
}

// admit takes a buffer of class c out of the front's budget, if the
// budget has room for it.
func (f *Front) admit(c int) bool {
	if f.queuedBytes.Add(queuedSizes[c]) > newClientBytes {
		f.queuedBytes.Add(-queuedSizes[c])
		return false
	}
	return true
}

// push queues q, admitted, or, if the queue is full, unqueues it and
// reports false.
func (f *Front) push(q *queued) bool {
	f.qmu.Lock()
	if len(f.queue)-f.head >= newClientQueue {
		f.qmu.Unlock()
		f.unqueue(q)
		return false
	}
	// Move down rather than grow once that frees half the room, so that a
	// backlog read as fast as it is queued does not move it all each time.
	if len(f.queue) == cap(f.queue) && f.head >= len(f.queue)/2 {
		n := copy(f.queue, f.queue[f.head:])
		clear(f.queue[n:])
		f.queue, f.head = f.queue[:n], 0
	}
	f.queue = append(f.queue, q)
	f.qmu.Unlock()
	f.signal()
	return true
}

// signal wakes a reader waiting for a datagram, unless one has yet to take
// the last signal.
func (f *Front) signal() {
	select {
	case f.ready <- struct{}{}:
	default:
	}
}

// unqueue takes q off the front's budget and back to its pool.
func (f *Front) unqueue(q *queued) {
	f.queuedBytes.Add(-queuedSizes[q.class])
	queuedPools[q.class].Put(q)
}

// passOn moves the datagrams still queued for f, which has left the
// socket's fronts, to the newest open front, to, within its bounds, or
// drops them if to is nil. s.mu is held, so no more come. A front gets
// datagrams only while it is the newest, so f's are older than all of
// to's if f opened first (a reload), newer if not (a config that failed
// to start): they go ahead of to's or after them, in their order.
func (f *Front) passOn(to *Front, older bool) {
	f.qmu.Lock()
	moved := f.queue[f.head:]
	f.queue, f.head = nil, 0
	f.qmu.Unlock()
	keep := moved[:0]
	for _, q := range moved {
		f.queuedBytes.Add(-queuedSizes[q.class])
		if to == nil || !to.admit(int(q.class)) {
			queuedPools[q.class].Put(q)
			f.s.queueFull.Add(1)
			continue
		}
		keep = append(keep, q)
	}
	clear(moved[len(keep):])
	if len(keep) == 0 {
		return
	}
	to.qmu.Lock()
	waiting := to.queue[to.head:]
	room := newClientQueue - len(waiting)
	for _, q := range keep[min(room, len(keep)):] { // past the count: the newest go
		to.unqueue(q)
		f.s.queueFull.Add(1)
	}
	keep = keep[:min(room, len(keep))]
	if older {
		to.queue = append(keep, waiting...)
	} else {
		to.queue = append(waiting, keep...)
	}
	to.head = 0
	to.qmu.Unlock()
	to.signal()
}

// udpAddr is a net.UDPAddr with room for its IP, allocated as one.
type udpAddr struct {
	addr net.UDPAddr
	ip   [16]byte
}

// newUDPAddr is net.UDPAddrFromAddrPort(ap) in one allocation instead of
// two. caddy-l4 keeps the address of a flow's first datagram as the
// flow's remote address, so each is a new one.
func newUDPAddr(ap netip.AddrPort) *net.UDPAddr {
	u := new(udpAddr)
	ip := ap.Addr()
	if ip.Is4() {
		a := ip.As4()
		u.addr.IP = append(u.ip[:0], a[:]...)
	} else {
		u.ip = ip.As16()
		u.addr.IP, u.addr.Zone = u.ip[:], ip.Zone()
	}
	u.addr.Port = int(ap.Port())
	return &u.addr
}

// WriteTo sends a datagram through the shared socket. On an unspecified
// address it leaves from the address the client's latest datagram was
// sent to, if the socket has seen one lately (Socket.Dst), or from the
// route's address if that one is no longer local (warned once).
func (f *Front) WriteTo(b []byte, addr net.Addr) (int, error) {
	if ua, ok := addr.(*net.UDPAddr); ok && f.s.wild {
		to := ua.AddrPort()
		src := f.s.Dst(udpio.Unmap(to))
		n, gone, err := udpio.WriteFrom(f.s.conn, b, to, src)
		if gone != nil && !f.warnedSrc.Swap(true) && f.logger != nil {
			f.logger.Warn("the address clients sent to is no longer local: replies leave from the route's address",
				zap.Stringer("source", src), zap.Error(gone))
		}
		return n, err
	}
	return f.s.conn.WriteTo(b, addr)
}

// Close detaches this config from the socket, which closes once no config
// uses it. The datagrams of new clients still queued for the front move to
// the socket's newest open front, whose config serves them.
func (f *Front) Close() error {
	var err error
	f.closeOnce.Do(func() {
		s := f.s
		s.mu.Lock()
		older := false // than the newest open front
		for i, g := range s.fronts {
			if g == f {
				older = i < len(s.fronts)-1
				s.fronts = append(s.fronts[:i], s.fronts[i+1:]...)
				break
			}
		}
		var to *Front
		if n := len(s.fronts); n > 0 {
			to = s.fronts[n-1]
		}
		f.passOn(to, older) // new clients' first datagrams, which the other config serves
		s.mu.Unlock()
		close(f.closed)
		err = s.release()
	})
	return err
}

// LocalAddr is the socket's address.
func (f *Front) LocalAddr() net.Addr { return f.s.conn.LocalAddr() }

// Closed reports whether the front is closed: the caddy-l4 server that
// read it has stopped.
func (f *Front) Closed() bool {
	select {
	case <-f.closed:
		return true
	default:
		return false
	}
}

// Unwrap returns the socket, as Caddy's own listener wrappers do.
func (f *Front) Unwrap() net.PacketConn { return f.s.conn }

// SetDeadline is a no-op: the socket is shared, and deadlines would reach
// every client.
func (f *Front) SetDeadline(time.Time) error { return nil }

// SetReadDeadline is a no-op; see SetDeadline.
func (f *Front) SetReadDeadline(time.Time) error { return nil }

// SetWriteDeadline is a no-op; see SetDeadline.
func (f *Front) SetWriteDeadline(time.Time) error { return nil }

// Interface guards
var _ net.PacketConn = (*Front)(nil)
