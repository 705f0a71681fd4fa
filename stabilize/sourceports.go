package stabilize

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"go.uber.org/zap"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// Source ports. In `per flow` mode (on Linux) a flow's upstream-facing
// socket is connected to its upstream, from a source port that stabilize
// picks so that one port serves a flow to every upstream: what must be
// unique is the 4-tuple (source address, source port, upstream), not the
// port. The kernel's own choice (bind to port 0, or connect with
// IP_BIND_ADDRESS_NO_PORT) keeps a UDP port unique per source address, so it
// would stop new flows at about 28,000 per source address, whatever the
// file limit. The sockets share ports with SO_REUSEADDR; the kernel
// delivers each reply to the socket connected to its sender.
//
// `per packet` sockets stay unconnected, each on a port of its own that the
// kernel picks: that mode has the wall of one port per flow and per source
// address, which local_addresses pushes back.

// sourcePorts is the process's table of the source ports in use, by source
// address and upstream, shared by every handler.
var sourcePorts = struct {
	sync.Mutex
	sets    map[portKey]*portSet
	sources map[netip.AddrPort]netip.Addr // the routing's source address by upstream
	lo, hi  uint16                        // the ephemeral port range, read once
}{sets: make(map[portKey]*portSet), sources: make(map[netip.AddrPort]netip.Addr)}

type portKey struct {
	src  netip.Addr
	peer netip.AddrPort
}

// portSet is the ports used from one source address to one upstream.
type portSet struct {
	next uint16 // where the next search starts
	n    int
	used [1 << 16 / 64]uint64
}

func (s *portSet) has(p uint16) bool { return s.used[p/64]&(1<<(p%64)) != 0 }

// takePort marks p used. sourcePorts is locked.
func takePort(k portKey, p uint16) {
	s := sourcePorts.sets[k]
	if s == nil {
		s = &portSet{next: sourcePorts.lo}
		sourcePorts.sets[k] = s
	}
	s.used[p/64] |= 1 << (p % 64)
	s.n++
}

// releasePort frees p. sourcePorts is locked.
func releasePort(k portKey, p uint16) {
	s := sourcePorts.sets[k]
	if s == nil || !s.has(p) {
		return
	}
	s.used[p/64] &^= 1 << (p % 64)
	if s.n--; s.n == 0 {
		delete(sourcePorts.sets, k)
	}
}

// connection is the state of a `per flow` flow's connected socket. fl.mu
// is held.
type connection struct {
	peer      netip.AddrPort // its upstream; invalid before the first
	unwatched bool           // a new socket the reply reactor does not watch yet
	connects  bool           // the socket is connected to the flow's upstream
	bound     bool           // the socket has been bound
	port      uint16         // its source port
	src       netip.Addr     // its source address
}

// connects says whether h's flows connect their sockets to their upstream:
// only `per flow`, where a flow has one upstream at a time. `per packet`
// and `per connection` send to several from one socket.
func (h *Handler) connects() bool {
	_, ok := h.router.(perFlowRouter)
	return ok
}

// upstreamSocket opens a new flow's upstream-facing socket: unbound until
// its first datagram in `per flow` mode on Linux; else bound to a port the
// kernel picks, on the next of local_addresses if there are any.
func (h *Handler) upstreamSocket() (upstreamConn, bool, error) {
	if udpio.Connected && h.connects() {
		conn, err := newUnbound(h.family())
		return conn, true, err
	}
	var local netip.Addr
	if len(h.locals) > 0 {
		local = h.locals[int(h.nextLocal.Add(1))%len(h.locals)]
	}
	conn, err := h.newBound(local)
	return conn, false, err
}

// family is the address family of the handler's upstream-facing sockets.
func (h *Handler) family() int {
	if h.network == "udp4" {
		return syscall.AF_INET
	}
	return syscall.AF_INET6
}

// connectTo connects a `per flow` flow's socket to u, its upstream, unless
// it is already, sending what sb (if not nil) holds first; a datagram that
// cannot go is dropped and counted. fl.mu is held.
func (fl *Flow) connectTo(u *Upstream, sb *sendBatch) bool {
	c := &fl.connection
	if !c.connects || c.peer == u.addr && !c.unwatched {
		return true
	}
	if sb != nil {
		fl.flush(sb) // what is queued leaves before the socket moves to u
	}
	if err := fl.connect(u); err != nil {
		h := fl.h
		h.drop(dropSocketUnavailable)
		h.warnOnce(dropSocketUnavailable, "dropping datagrams: connecting an upstream socket failed",
			zap.Stringer("client", fl.client), zap.Stringer("upstream", u.addr), zap.Error(err))
		return false
	}
	return true
}

// sendAddr is the address to send fl's datagrams for u to: none when the
// socket is connected to u, so that the kernel uses the socket's cached
// route instead of looking one up for every datagram. fl.mu is held.
func (fl *Flow) sendAddr(u *Upstream) netip.AddrPort {
	if fl.connection.connects {
		return netip.AddrPort{} // connectTo has connected it to u
	}
	return u.addr
}

// connect binds and connects fl's socket, or puts a new one in its place,
// so that it sends to u from a source port no other flow uses towards u.
// The port is reserved in sourcePorts before the system calls, which run
// without the lock, so that flows are set up in parallel; a reservation
// whose call fails is undone. fl.mu is held.
func (fl *Flow) connect(u *Upstream) error {
	if fl.closed.Load() {
		return net.ErrClosed
	}
	c := &fl.connection
	if c.unwatched && c.peer == u.addr {
		return fl.watch() // connected, but not watched for replies yet
	}
	src, err := fl.h.sourceFor(c, u.addr)
	if err != nil {
		return err
	}
	k := portKey{src, u.addr}
	if c.peer.IsValid() && c.src == src && reservePort(k, c.port) {
		// Moving to another upstream, where the port is free: keep it.
		if err := udpio.Reconnect(fl.conn, u.addr); err != nil {
			unreservePort(k, c.port)
			return fmt.Errorf("reconnecting to %s: %w", u.addr, err)
		}
		fl.connected(k, c.port)
		if c.unwatched {
			return fl.watch()
		}
		return nil
	}
	var from uint16 // where the search starts: 0, where the last one for k ended
	for tries := 1; ; tries++ {
		p, lo, hi, ok := reserveNextPort(k, from)
		if !ok || tries > int(hi-lo)+1 {
			if ok {
				unreservePort(k, p)
			}
			return fmt.Errorf("no free source port from %s to %s in %d-%d", src, u.addr, lo, hi)
		}
		local := netip.AddrPortFrom(src, p)
		replacing := c.bound
		if replacing {
			// A new socket, set up like the one it replaces.
			err = fl.replace(local, u.addr)
		} else {
			err = udpio.Connect(fl.conn, local, u.addr)
		}
		if err != nil {
			unreservePort(k, p)
		}
		if udpio.IsAddrInUse(err) {
			from = p + 1 // held by a socket that does not share it
			continue
		}
		c.bound = true // even a failed connect may have bound the socket
		if err != nil {
			if udpio.IsAddrNotAvail(err) {
				sourcePorts.Lock()
				delete(sourcePorts.sources, u.addr) // renumbered: look it up again
				sourcePorts.Unlock()
			}
			return fmt.Errorf("connecting from %s to %s: %w", local, u.addr, err)
		}
		fl.connected(k, p)
		if replacing || c.unwatched {
			// Closing the replaced socket took it off the reply reactor.
			return fl.watch()
		}
		return nil
	}
}

// connected records that fl's socket now holds the 4-tuple of k and port p,
// which connect reserved, and frees the one it held. fl.mu is held.
func (fl *Flow) connected(k portKey, p uint16) {
	c := &fl.connection
	if c.peer.IsValid() {
		sourcePorts.Lock()
		releasePort(portKey{c.src, c.peer}, c.port)
		sourcePorts.Unlock()
	}
	c.src, c.port, c.peer = k.src, p, k.peer
}

// watch registers fl's socket with its reply reactor again, after a new
// socket took its descriptor. Until that succeeds the flow is not
// connected for forwarding (connectTo): its datagrams are dropped, counted,
// and the next one tries again, as replies to a socket the reactor does not
// watch would never be read. fl.mu is held.
func (fl *Flow) watch() error {
	c := &fl.connection
	if err := fl.rearm(); err != nil {
		c.unwatched = true
		return fmt.Errorf("watching the new socket for replies: %w", err)
	}
	c.unwatched = false
	return nil
}

// reservePort takes port p towards k's upstream if it is free there.
func reservePort(k portKey, p uint16) bool {
	sourcePorts.Lock()
	defer sourcePorts.Unlock()
	if s := sourcePorts.sets[k]; s != nil && s.has(p) {
		return false
	}
	takePort(k, p)
	return true
}

// reserveNextPort takes the next free source port towards k's upstream,
// from port from, or if it is 0 from where the previous search for k ended,
// and returns it and the range of source ports, read from the system once;
// false if none is free.
func reserveNextPort(k portKey, from uint16) (p, lo, hi uint16, ok bool) {
	sourcePorts.Lock()
	defer sourcePorts.Unlock()
	if sourcePorts.lo == 0 {
		sourcePorts.lo, sourcePorts.hi = udpio.LocalPortRange()
	}
	lo, hi = sourcePorts.lo, sourcePorts.hi
	s := sourcePorts.sets[k]
	switch {
	case from != 0:
		p = from
	case s != nil:
		p = s.next
	default:
		p = lo
	}
	for range int(hi-lo) + 1 {
		if p < lo || p > hi {
			p = lo
		}
		if s == nil || !s.has(p) {
			takePort(k, p)
			sourcePorts.sets[k].next = p + 1
			return p, lo, hi, true
		}
		p++
	}
	return 0, lo, hi, false
}

// unreservePort undoes a reservation whose system call failed.
func unreservePort(k portKey, p uint16) {
	sourcePorts.Lock()
	releasePort(k, p)
	sourcePorts.Unlock()
}

// sourceFor picks the source address of a connection to peer: the
// connection's own when it has one of peer's family, else the next of
// local_addresses of that family, else the routing's choice, looked up once
// per upstream.
func (h *Handler) sourceFor(c *connection, peer netip.AddrPort) (netip.Addr, error) {
	is4 := peer.Addr().Unmap().Is4()
	if c.src.IsValid() && c.src.Is4() == is4 {
		return c.src, nil
	}
	if locals := h.localsOf(is4); len(locals) > 0 {
		return locals[int(h.nextLocal.Add(1))%len(locals)], nil
	}
	sourcePorts.Lock()
	src, ok := sourcePorts.sources[peer]
	sourcePorts.Unlock()
	if ok {
		return src, nil
	}
	src, err := udpio.Source(h.family(), peer)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("finding the source address for %s: %w", peer, err)
	}
	sourcePorts.Lock()
	sourcePorts.sources[peer] = src
	sourcePorts.Unlock()
	return src, nil
}

// localsOf returns local_addresses of one family.
func (h *Handler) localsOf(is4 bool) []netip.Addr {
	if is4 {
		return h.locals4
	}
	return h.locals6
}

// releaseSource frees a closed flow's source port. fl.mu is held.
func (fl *Flow) releaseSource() {
	c := &fl.connection
	if !c.peer.IsValid() {
		return
	}
	sourcePorts.Lock()
	releasePort(portKey{c.src, c.peer}, c.port)
	sourcePorts.Unlock()
	c.peer = netip.AddrPort{}
}

// provisionLocalAddresses checks LocalAddresses against the upstreams'
// address families.
func (h *Handler) provisionLocalAddresses(has4, has6 bool) error {
	h.locals, h.locals4, h.locals6 = nil, nil, nil
	if len(h.LocalAddresses) == 0 {
		return nil
	}
	seen := make(map[netip.Addr]bool, len(h.LocalAddresses))
	for i, s := range h.LocalAddresses {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return fmt.Errorf("local_addresses[%d] %q: not an IP address", i, s)
		}
		a = a.Unmap()
		if a.IsUnspecified() || a.IsMulticast() {
			return fmt.Errorf("local_addresses[%d] %q: must be a unicast address", i, s)
		}
		if seen[a] {
			return fmt.Errorf("local_addresses[%d] %q: listed twice", i, s)
		}
		seen[a] = true
		if (a.Is4() && !has4) || (a.Is6() && !has6) {
			return fmt.Errorf("local_addresses[%d] %q: no upstream of its address family", i, s)
		}
		conn, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
		if err != nil {
			return fmt.Errorf("local_addresses[%d] %q: %w", i, s, err)
		}
		_ = conn.Close()
		h.locals = append(h.locals, a)
		if a.Is4() {
			h.locals4 = append(h.locals4, a)
		} else {
			h.locals6 = append(h.locals6, a)
		}
	}
	switch {
	case has4 && len(h.locals4) == 0:
		return fmt.Errorf("local_addresses %q: none for the IPv4 upstreams", h.LocalAddresses)
	case has6 && len(h.locals6) == 0:
		return fmt.Errorf("local_addresses %q: none for the IPv6 upstreams", h.LocalAddresses)
	case has4 && has6 && !h.connects():
		return fmt.Errorf("local_addresses %q: per %s sends to several upstreams from one socket, so its upstreams must be of one address family", h.LocalAddresses, h.Per)
	}
	return nil
}
