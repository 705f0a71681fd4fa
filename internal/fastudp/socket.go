// Package fastudp is stabilize's own UDP listener socket. It reads
// datagrams in batches and delivers those of registered clients straight to
// their Endpoint, bypassing caddy-l4's per-datagram dispatch; datagrams of
// other clients wait in a bounded queue for caddy-l4, which reads them
// through a Front. A socket is shared by every config that listens on its
// address and outlives config reloads while any of them uses it.
package fastudp

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"math/bits"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/cpu"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// Endpoint receives the datagrams of one registered client.
type Endpoint interface {
	// Deliver handles one datagram from the client. d.B is valid only
	// during the call. now is the batch's arrival time in Unix nanoseconds.
	Deliver(d Datagram, now int64)
	// Expired reports whether the endpoint has ended by now; the socket's
	// reaper then closes it.
	Expired(now int64) bool
	// Close ends the endpoint; it unregisters itself, unless another
	// endpoint has replaced it. The socket may call it more than once, and
	// after the endpoint was unregistered or replaced.
	Close()
}

// Datagram is one datagram of a batch.
type Datagram struct {
	// B is the datagram's bytes.
	B []byte
	// Truncated says it was longer than the socket's buffer.
	Truncated bool
	// Dst is the host's address that the client sent it to, on a socket
	// bound to an unspecified address, where replies must name it as
	// their source; else invalid (udpio.Batch.Dst).
	Dst netip.Addr
}

// BatchEndpoint is an Endpoint that takes all its datagrams of one read
// batch at once, so that it can send them on with one system call.
type BatchEndpoint interface {
	Endpoint
	// DeliverBatch handles datagrams from the client, in their order; ds
	// and their bytes are valid only during the call.
	DeliverBatch(ds []Datagram, now int64)
}

// Warmer is an Endpoint that can load what a delivery will read into the
// CPU's cache ahead of it. The socket warms every endpoint of a read batch
// before it delivers to the first, so that with many endpoints, whose
// memory has gone cold, the cache misses overlap instead of following one
// another.
type Warmer interface {
	Warm()
}

// Sizes.
const (
	// BufferSize is the longest datagram delivered whole.
	BufferSize = 9000
	// batchSize is how many datagrams one recvmmsg reads at most.
	batchSize = 64
	// newClientQueue and newClientBytes bound the datagrams of
	// unregistered clients waiting for caddy-l4: by count, and by the
	// bytes of their buffers, each of its size class (queuedSizes). So a
	// burst of new flows (10,000 clients starting at once send 10,000
	// first datagrams) waits while caddy-l4 sets them up: up to 16,384
	// datagrams of 256 bytes or less, or 466 of BufferSize, in as many
	// bytes as the socket's receive buffer. More are dropped and counted
	// (queue_full) rather than stall the registered clients.
	newClientQueue = 1 << 14
	newClientBytes = SocketBuffer
	// SocketBuffer is the receive and send buffer size of a socket, so that
	// a burst from many clients is not dropped by the kernel; stabilize
	// gives udp/ listeners' sockets the same.
	SocketBuffer = 4 << 20
	// reapInterval is how often expired endpoints are looked for.
	reapInterval = time.Second
)

// Socket is one UDP socket of the fast network.
type Socket struct {
	key     string
	wild    bool           // bound to an unspecified address
	conn    *net.UDPConn   // the first reader's; replies leave through it
	conns   []*net.UDPConn // one per reader, under registryMu
	serving sync.WaitGroup // the readers
	done    chan struct{}  // closed once every reader has returned
	refs    int            // under registryMu

	mu     sync.Mutex
	fronts []*Front // open ones, newest last

	eps  [epShards]epShard // the registered clients' endpoints
	seed maphash.Seed      // spreads clients over eps

	// On an unspecified address: the destination of each unregistered
	// client's latest datagram for caddy-l4, for the endpoint it may
	// open (Dst). The reaper drops those older than one interval, so a
	// client that registers none leaves its entry for two at most.
	dstMu            sync.Mutex
	dsts, dstsBefore map[netip.AddrPort]netip.Addr

	queueFull atomic.Uint64 // datagrams of new clients dropped: queue full
	truncated atomic.Uint64 // datagrams of unregistered clients cut short
	coalesced atomic.Uint64 // datagrams read coalesced (UDP GRO) and split
}

// epShards is the number of shards of a socket's endpoint table. A
// registration locks one shard, so that new clients' registrations spread
// over the locks, and the reaper's walk holds one shard's read lock at a
// time, never the whole table's (at 100,000 clients the walk took about
// 6 ms, during which every registration and then every reader waited).
const epShards = 64

// epShard is a share of a socket's endpoints, on cache lines of its own.
type epShard struct {
	mu sync.RWMutex
	m  map[netip.AddrPort]Endpoint
	_  cpu.CacheLinePad
}

var (
	registryMu sync.Mutex
	registry   = make(map[string]*Socket) // by the address asked for
)

// MaxReaders is the most readers a socket may have.
const MaxReaders = 64

// Listen returns a new Front of the socket at addr ("host:port"), opening
// the socket if no config uses it yet. The socket gets readers sockets,
// each with its own reader, on the same address (SO_REUSEPORT; Linux only,
// elsewhere one): the kernel spreads clients over them by a hash of their
// address, so each stays on one. An open socket gains or loses readers to
// match; its flows go on, whichever reader gets them. When the front
// closes, the socket goes back to the readers of its newest open front,
// so that a config that failed to start leaves the running one's.
//
// The caller validates readers (the stabilize app names the setting);
// values outside 1 to MaxReaders are only clamped here, defensively.
func Listen(addr string, readers int) (*Front, error) {
	readers = min(max(readers, 1), MaxReaders)
	if !udpio.HasReusePort {
		readers = 1
	}
	registryMu.Lock()
	defer registryMu.Unlock()
	s := registry[addr]
	if s == nil {
		var err error
		if s, err = open(addr, readers); err != nil {
			return nil, err
		}
		registry[addr] = s
	} else {
		had := len(s.conns)
		if err := s.resize(readers); err != nil {
			_ = s.resize(had) // closing readers does not fail
			return nil, err
		}
	}
	s.refs++
	f := &Front{s: s, readers: readers, ready: make(chan struct{}, 1), closed: make(chan struct{})}
	s.mu.Lock()
	s.fronts = append(s.fronts, f)
	s.mu.Unlock()
	return f, nil
}

// Sockets returns the open sockets.
func Sockets() []*Socket {
	registryMu.Lock()
	defer registryMu.Unlock()
	list := make([]*Socket, 0, len(registry))
	for _, s := range registry {
		list = append(list, s)
	}
	return list
}

func open(addr string, readers int) (*Socket, error) {
	first, err := listen(addr)
	if err != nil {
		return nil, err
	}
	s := &Socket{
		key:  addr,
		wild: first.LocalAddr().(*net.UDPAddr).IP.IsUnspecified(),
		conn: first,
		done: make(chan struct{}),
		seed: maphash.MakeSeed(),
	}
	for i := range s.eps {
		s.eps[i].m = make(map[netip.AddrPort]Endpoint)
	}
	if err := s.serveConn(first); err != nil {
		_ = first.Close()
		return nil, err
	}
	if err := s.resize(readers); err != nil {
		s.closeConns()
		return nil, err
	}
	go func() {
		s.serving.Wait()
		close(s.done)
	}()
	go s.reap()
	return s, nil
}

// listen opens a socket at addr, with SO_REUSEPORT where there is one, so
// that readers can be added on the same address.
func listen(addr string) (*net.UDPConn, error) {
	var lc net.ListenConfig
	if udpio.HasReusePort {
		lc.Control = udpio.ReusePort
		var err error
		if addr, err = ownPort(addr); err != nil {
			return nil, err
		}
	}
	pc, err := lc.ListenPacket(context.Background(), "udp", addr)
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// ownPort turns port 0 in addr into a port no socket holds: the kernel may
// give a socket with SO_REUSEPORT a port that another one of the same user
// holds, and the two would share its datagrams.
func ownPort(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || port != "0" {
		return addr, err
	}
	c, err := net.ListenPacket("udp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	return net.JoinHostPort(host, strconv.Itoa(c.LocalAddr().(*net.UDPAddr).Port)), nil
}

// serveConn starts a reader on c, one of the socket's; under registryMu
// once the socket is open.
func (s *Socket) serveConn(c *net.UDPConn) error {
	_, _ = udpio.GrowBuffers(c, SocketBuffer)
	b, err := udpio.NewGROBatch(c, batchSize, BufferSize) // without UDP GRO, as before
	if err != nil {
		return err
	}
	s.conns = append(s.conns, c)
	s.serving.Go(func() { s.serve(b) })
	return nil
}

// resize opens or closes readers until the socket has n; the first, which
// replies leave through, stays. Under registryMu once the socket is open.
func (s *Socket) resize(n int) error {
	for len(s.conns) > n {
		last := len(s.conns) - 1
		_ = s.conns[last].Close()
		s.conns = s.conns[:last]
	}
	for len(s.conns) < n {
		c, err := listen(s.conn.LocalAddr().String()) // the port the first got, for port 0
		if err != nil {
			return fmt.Errorf("adding a reader: %w", err)
		}
		if err := s.serveConn(c); err != nil {
			_ = c.Close()
			return fmt.Errorf("adding a reader: %w", err)
		}
	}
	return nil
}

func (s *Socket) closeConns() {
	for _, c := range s.conns {
		_ = c.Close()
	}
}

// release drops one reference; the last closes the socket and its
// endpoints, which have no way to their clients any more. Otherwise the
// socket goes back to the readers of its newest open front.
func (s *Socket) release() error {
	registryMu.Lock()
	if s.refs--; s.refs > 0 {
		defer registryMu.Unlock()
		s.mu.Lock()
		readers := len(s.conns) // when the others are closing too
		if len(s.fronts) > 0 {
			readers = s.fronts[len(s.fronts)-1].readers
		}
		s.mu.Unlock()
		return s.resize(readers)
	}
	delete(registry, s.key)
	registryMu.Unlock()
	s.closeConns()
	<-s.done
	var eps []Endpoint
	for i := range s.eps {
		eps = s.eps[i].collect(eps)
	}
	for _, ep := range eps {
		ep.Close()
	}
	return nil
}

// Open reports whether a config still listens on the socket.
func (s *Socket) Open() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// Key is the address the socket was asked for.
func (s *Socket) Key() string { return s.key }

// Readers is how many sockets, each with a reader, the socket has.
func (s *Socket) Readers() int {
	registryMu.Lock()
	defer registryMu.Unlock()
	return len(s.conns)
}

// Conn is the socket. Writes to it go to clients.
func (s *Socket) Conn() *net.UDPConn { return s.conn }

// Drops returns how many datagrams of unregistered clients were dropped:
// because the queue for caddy-l4 was full, and because they were cut short.
func (s *Socket) Drops() (queueFull, truncated uint64) {
	return s.queueFull.Load(), s.truncated.Load()
}

// Coalesced is how many datagrams the kernel delivered coalesced (UDP GRO:
// a client's burst of one size read as one), which the socket split again
// before delivery.
func (s *Socket) Coalesced() uint64 { return s.coalesced.Load() }

// shard returns the shard of client's endpoint.
func (s *Socket) shard(client netip.AddrPort) *epShard {
	var b [18]byte
	a := client.Addr().As16()
	copy(b[:], a[:])
	b[16], b[17] = byte(client.Port()>>8), byte(client.Port())
	return &s.eps[maphash.Bytes(s.seed, b[:])%epShards]
}

// endpoint returns client's endpoint, or nil.
func (s *Socket) endpoint(client netip.AddrPort) Endpoint {
	sh := s.shard(client)
	sh.mu.RLock()
	ep := sh.m[client]
	sh.mu.RUnlock()
	return ep
}

// collect appends the shard's endpoints to eps.
func (sh *epShard) collect(eps []Endpoint) []Endpoint {
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	for _, ep := range sh.m {
		eps = append(eps, ep)
	}
	return eps
}

// Register delivers client's datagrams to ep from now on.
func (s *Socket) Register(client netip.AddrPort, ep Endpoint) {
	sh := s.shard(client)
	sh.mu.Lock()
	sh.m[client] = ep
	sh.mu.Unlock()
}

// Unregister sends client's datagrams back to caddy-l4, unless another
// endpoint has replaced ep.
func (s *Socket) Unregister(client netip.AddrPort, ep Endpoint) {
	sh := s.shard(client)
	sh.mu.Lock()
	if sh.m[client] == ep {
		delete(sh.m, client)
	}
	sh.mu.Unlock()
}

// PassOn unregisters ep, unless another endpoint has replaced it, and
// queues d, a datagram from client that ep was handed, for caddy-l4, as a
// new client's: the route it reaches decides who takes the client next.
func (s *Socket) PassOn(client netip.AddrPort, ep Endpoint, d Datagram) {
	s.Unregister(client, ep)
	s.toCaddy(client, d.B, d.Dst)
}

// Dst is the host's address that client's latest datagram for caddy-l4
// was sent to, on a socket bound to an unspecified address; else, or if
// the socket has not seen client lately, invalid. An endpoint opened for
// client replies from it until its datagrams tell another (Datagram.Dst).
// A destination looked up is kept for another interval: a handler that
// writes to a quiet client through the front keeps it while it writes.
func (s *Socket) Dst(client netip.AddrPort) netip.Addr {
	s.dstMu.Lock()
	defer s.dstMu.Unlock()
	if dst, ok := s.dsts[client]; ok {
		return dst
	}
	dst, ok := s.dstsBefore[client]
	if ok {
		s.keepDst(client, dst)
	}
	return dst
}

// keepDst records dst as client's for this interval, within maxDsts.
// s.dstMu is held.
func (s *Socket) keepDst(client netip.AddrPort, dst netip.Addr) {
	if s.dsts == nil {
		s.dsts = make(map[netip.AddrPort]netip.Addr)
	}
	if len(s.dsts) < maxDsts {
		s.dsts[client] = dst
	}
}

// Endpoints is the number of registered clients.
func (s *Socket) Endpoints() int {
	n := 0
	for i := range s.eps {
		sh := &s.eps[i]
		sh.mu.RLock()
		n += len(sh.m)
		sh.mu.RUnlock()
	}
	return n
}

// serve reads datagrams in batches until the socket closes. It looks up a
// batch's endpoints, each under its shard's read lock, and delivers outside
// the locks, so that a slow endpoint never holds up registration. A BatchEndpoint gets all its
// datagrams of a batch in one call, in their order. With UDP GRO a read
// batch may hold more datagrams than messages: eps and ds grow to the most
// seen.
func (s *Socket) serve(b *udpio.Batch) {
	defer b.Close()
	eps := make([]Endpoint, batchSize)
	ds := make([]Datagram, 0, batchSize)
	for {
		n, err := b.Read()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		now := time.Now().UnixNano()
		if n > len(eps) {
			eps, ds = make([]Endpoint, n), make([]Datagram, 0, n)
		}
		if c := b.Coalesced(); c > 0 {
			s.coalesced.Add(uint64(c))
		}
		var last netip.AddrPort
		for i := range n {
			src, _, _ := b.Message(i)
			if i == 0 || src != last { // a coalesced burst's datagrams share their source
				eps[i], last = s.endpoint(src), src
			} else {
				eps[i] = eps[i-1]
			}
		}
		for _, ep := range eps[:n] {
			if w, ok := ep.(Warmer); ok {
				w.Warm()
			}
		}
		for i := range n {
			src, data, truncated := b.Message(i)
			ep := eps[i]
			eps[i] = nil
			switch {
			case ep == delivered:
			case ep != nil:
				deliver(b, ep, eps[i+1:n], i+1, ds[:0], now)
			case truncated:
				s.truncated.Add(1)
			default:
				s.toCaddy(src, data, b.Dst(i))
			}
		}
	}
}

// deliver hands datagram i-1 of a batch to its endpoint, ep, with the
// batch's later datagrams for it if ep takes batches; later, from datagram
// i on, are the later datagrams' endpoints, where it marks those it
// delivers.
func deliver(b *udpio.Batch, ep Endpoint, later []Endpoint, i int, ds []Datagram, now int64) {
	_, data, truncated := b.Message(i - 1)
	d := Datagram{data, truncated, b.Dst(i - 1)}
	be, ok := ep.(BatchEndpoint)
	if !ok {
		ep.Deliver(d, now)
		return
	}
	ds = append(ds, d)
	for j, other := range later {
		if other == ep {
			_, data, truncated := b.Message(i + j)
			ds = append(ds, Datagram{data, truncated, b.Dst(i + j)})
			later[j] = delivered
		}
	}
	if len(ds) == 1 {
		ep.Deliver(d, now)
		return
	}
	be.DeliverBatch(ds, now)
	clear(ds)
}

// delivered marks the datagrams of a batch already delivered with an
// earlier one.
var delivered Endpoint = deliveredMark{}

type deliveredMark struct{}

func (deliveredMark) Deliver(Datagram, int64) {}
func (deliveredMark) Expired(int64) bool      { return false }
func (deliveredMark) Close()                  {}

// toCaddy queues a copy of a datagram of an unregistered client, sent to
// dst, for the newest config's listener, within the front's bounds. A
// datagram dropped costs no allocation, so a flood makes no garbage. It
// holds s.mu until the datagram is queued, so that a front that closes
// finds every datagram queued for it (Front.Close).
func (s *Socket) toCaddy(src netip.AddrPort, data []byte, dst netip.Addr) {
	data = data[:min(len(data), BufferSize)]
	c := queuedClass(len(data))
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.fronts) == 0 {
		s.queueFull.Add(1) // between configs: no listener reads new clients
		return
	}
	f := s.fronts[len(s.fronts)-1]
	if !f.admit(c) {
		s.queueFull.Add(1)
		return
	}
	q, _ := queuedPools[c].Get().(*queued)
	if q == nil {
		q = &queued{b: make([]byte, 0, queuedSizes[c]), class: uint8(c)}
	}
	q.b, q.src = append(q.b[:0], data...), src
	if dst.IsValid() { // before caddy-l4 may read it
		s.dstMu.Lock()
		s.keepDst(src, dst)
		s.dstMu.Unlock()
	}
	if !f.push(q) {
		s.queueFull.Add(1)
	}
}

// maxDsts bounds the destinations a socket keeps per reap interval (Dst):
// past it, a flood of new clients costs no more memory, and replies to
// the clients not kept leave from the route's address.
const maxDsts = 1 << 16

// ageDsts forgets the destinations of clients that have sent caddy-l4
// nothing for an interval (Dst).
func (s *Socket) ageDsts() {
	s.dstMu.Lock()
	before := s.dstsBefore
	clear(before)
	s.dstsBefore, s.dsts = s.dsts, before
	s.dstMu.Unlock()
}

// reap closes expired endpoints until the socket closes. It copies one
// shard's endpoints at a time under the shard's read lock and asks them
// whether they have expired outside it, as their memory may have gone cold.
func (s *Socket) reap() {
	t := time.NewTicker(reapInterval)
	defer t.Stop()
	var eps []Endpoint
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		s.ageDsts()
		now := time.Now().UnixNano()
		for i := range s.eps {
			eps = s.eps[i].collect(eps[:0])
			for _, ep := range eps {
				if ep.Expired(now) {
					ep.Close()
				}
			}
			clear(eps)
		}
	}
}

// queued is a datagram waiting for caddy-l4, in a buffer of its size
// class.
type queued struct {
	b     []byte
	src   netip.AddrPort
	class uint8
}

// queuedSizes are the buffer sizes of the classes of queued datagrams:
// powers of two from 64 bytes, and BufferSize, which a datagram's copy
// never exceeds.
var queuedSizes = [...]int64{64, 128, 256, 512, 1024, 2048, 4096, BufferSize}

// queuedPools holds the queued datagrams of each class for reuse.
var queuedPools [len(queuedSizes)]sync.Pool

// queuedClass is the smallest class that holds n bytes.
func queuedClass(n int) int {
	if n <= int(queuedSizes[0]) {
		return 0
	}
	return min(bits.Len(uint(n-1))-bits.Len(uint(queuedSizes[0]-1)), len(queuedSizes)-1)
}
