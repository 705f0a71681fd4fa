package stabilize

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// FastNetwork is the network of stabilize's own UDP listener: listen on
// `fastudp/:5000` instead of `udp/:5000`. Its socket reads datagrams in
// batches (recvmmsg) and forwards the datagrams of established stabilize
// flows itself, without caddy-l4's per-datagram dispatch; replies go out
// through the same socket. caddy-l4 still matches and routes each new flow.
// The socket outlives config reloads while any config listens on it.
const FastNetwork = "fastudp"

func init() {
	caddy.RegisterNetwork(FastNetwork, listenFast)
}

// fastSockets holds the open fast sockets by address, across reloads.
var fastSockets = caddy.NewUsagePool()

// fastByLocal finds a fast socket by the local address a flow reports.
var fastByLocal sync.Map // string -> *fastSocket

// fastSocketBuffer is the receive and send buffer size of a fast socket, so
// that a burst from many clients is not dropped by the kernel.
const fastSocketBuffer = 4 << 20

// newFlowQueue is how many datagrams of new flows wait for caddy-l4; more
// are dropped and counted rather than stall established flows.
const newFlowQueue = 256

func listenFast(_ context.Context, network, host, portRange string, portOffset uint, _ net.ListenConfig) (any, error) {
	start, _, _ := strings.Cut(portRange, "-")
	port, err := strconv.ParseUint(start, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("%s: port %q: %w", network, portRange, err)
	}
	addr := net.JoinHostPort(host, strconv.FormatUint(port+uint64(portOffset), 10))
	v, _, err := fastSockets.LoadOrNew(addr, func() (caddy.Destructor, error) {
		return openFastSocket(addr)
	})
	if err != nil {
		return nil, err
	}
	s := v.(*fastSocket)
	f := &front{s: s, queue: make(chan *queued, newFlowQueue), closed: make(chan struct{})}
	s.mu.Lock()
	s.fronts = append(s.fronts, f)
	s.mu.Unlock()
	return f, nil
}

// fastSocket is one UDP socket of the fast network, shared by the configs
// that listen on its address.
type fastSocket struct {
	key    string
	conn   *net.UDPConn
	rc     syscall.RawConn
	family int // the socket's address family, for sendmmsg
	done   chan struct{}

	mu     sync.Mutex
	fronts []*front // open ones, newest last

	flowsMu sync.RWMutex
	flows   map[netip.AddrPort]*Flow // established flows, by client

	queueDrops atomic.Uint64 // datagrams of new flows dropped: queue full
	truncated  atomic.Uint64 // datagrams of unknown flows cut short
}

func openFastSocket(addr string) (*fastSocket, error) {
	pc, err := new(net.ListenConfig).ListenPacket(context.Background(), "udp", addr)
	if err != nil {
		return nil, err
	}
	conn := pc.(*net.UDPConn)
	rc, err := conn.SyscallConn()
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	growBuffers(rc, fastSocketBuffer)
	s := &fastSocket{
		key:    addr,
		conn:   conn,
		rc:     rc,
		family: socketFamily(rc),
		done:   make(chan struct{}),
		flows:  make(map[netip.AddrPort]*Flow),
	}
	fastByLocal.Store(s.conn.LocalAddr().String(), s)
	go s.serve()
	go s.reap()
	return s, nil
}

// Destruct closes the socket when no config uses it any more.
func (s *fastSocket) Destruct() error {
	fastByLocal.Delete(s.conn.LocalAddr().String())
	err := s.conn.Close()
	<-s.done
	return err
}

// fastSocketFor returns the fast socket a flow arrived on, or nil.
func fastSocketFor(local net.Addr) *fastSocket {
	if s, ok := fastByLocal.Load(local.String()); ok {
		return s.(*fastSocket)
	}
	return nil
}

// serve reads datagrams in batches until the socket closes. Datagrams of
// established flows are forwarded here; others go to caddy-l4.
func (s *fastSocket) serve() {
	defer close(s.done)
	b, err := newBatch(s.conn, 64, ListenerBufferSize)
	if err != nil {
		return
	}
	for {
		n, err := b.read()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		now := time.Now().UnixNano()
		s.flowsMu.RLock()
		for i := range n {
			src, data, truncated := b.message(i)
			fl := s.flows[src]
			switch {
			case truncated && fl != nil:
				fl.h.drop(dropTruncated)
			case truncated:
				s.truncated.Add(1)
			case fl != nil:
				fl.lastActive.Store(now)
				fl.forward(data)
			default:
				s.toCaddy(src, data)
			}
		}
		s.flowsMu.RUnlock()
	}
}

// toCaddy queues a datagram of a new flow for the newest config's listener.
func (s *fastSocket) toCaddy(src netip.AddrPort, data []byte) {
	s.mu.Lock()
	var f *front
	if len(s.fronts) > 0 {
		f = s.fronts[len(s.fronts)-1]
	}
	s.mu.Unlock()
	if f == nil {
		s.queueDrops.Add(1) // between configs: no listener reads new flows
		return
	}
	q := queuedPool.Get().(*queued)
	q.n = copy(q.buf[:], data)
	q.addr = net.UDPAddrFromAddrPort(src)
	select {
	case f.queue <- q:
	default:
		queuedPool.Put(q)
		s.queueDrops.Add(1)
	}
}

// register makes fl's datagrams bypass caddy-l4.
func (s *fastSocket) register(fl *Flow) {
	s.flowsMu.Lock()
	s.flows[fl.client] = fl
	s.flowsMu.Unlock()
}

// unregister sends fl's client back to caddy-l4, unless a newer flow of the
// same client has replaced it.
func (s *fastSocket) unregister(fl *Flow) {
	s.flowsMu.Lock()
	if s.flows[fl.client] == fl {
		delete(s.flows, fl.client)
	}
	s.flowsMu.Unlock()
}

// reap ends flows whose Handle has returned once they have been idle for
// caddy-l4's idle timeout.
func (s *fastSocket) reap() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var idle []*Flow
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		now := time.Now().UnixNano()
		idle = idle[:0]
		s.flowsMu.RLock()
		for _, fl := range s.flows {
			if fl.detached.Load() && now-fl.lastActive.Load() > int64(fl.idleTimeout) {
				idle = append(idle, fl)
			}
		}
		s.flowsMu.RUnlock()
		for _, fl := range idle {
			fl.close()
		}
	}
}

// queued is a datagram waiting for caddy-l4.
type queued struct {
	buf  [ListenerBufferSize]byte
	n    int
	addr net.Addr
}

var queuedPool = sync.Pool{New: func() any { return new(queued) }}

// front is one config's view of a fast socket: the net.PacketConn that
// caddy-l4 reads new flows from.
type front struct {
	s         *fastSocket
	queue     chan *queued
	closed    chan struct{}
	closeOnce sync.Once
}

// ReadFrom returns the next datagram of a new flow.
func (f *front) ReadFrom(b []byte) (int, net.Addr, error) {
	select {
	case q := <-f.queue:
		n, addr := copy(b, q.buf[:q.n]), q.addr
		queuedPool.Put(q)
		return n, addr, nil
	case <-f.closed:
		return 0, nil, net.ErrClosed
	}
}

// WriteTo sends a datagram through the shared socket.
func (f *front) WriteTo(b []byte, addr net.Addr) (int, error) {
	return f.s.conn.WriteTo(b, addr)
}

// Close detaches this config from the socket, which closes once no config
// uses it.
func (f *front) Close() error {
	f.closeOnce.Do(func() {
		s := f.s
		s.mu.Lock()
		for i, g := range s.fronts {
			if g == f {
				s.fronts = append(s.fronts[:i], s.fronts[i+1:]...)
				break
			}
		}
		s.mu.Unlock()
		close(f.closed)
		_, _ = fastSockets.Delete(s.key)
	})
	return nil
}

// LocalAddr is the socket's address.
func (f *front) LocalAddr() net.Addr { return f.s.conn.LocalAddr() }

// SetDeadline is a no-op: the socket is shared, and deadlines would reach
// every flow.
func (f *front) SetDeadline(time.Time) error { return nil }

// SetReadDeadline is a no-op; see SetDeadline.
func (f *front) SetReadDeadline(time.Time) error { return nil }

// SetWriteDeadline is a no-op; see SetDeadline.
func (f *front) SetWriteDeadline(time.Time) error { return nil }

// Interface guards
var (
	_ net.PacketConn   = (*front)(nil)
	_ caddy.Destructor = (*fastSocket)(nil)
)
