package stabilize

import (
	"math/bits"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/stabilize-lb/caddy-stabilize/internal/quicwire"
)

// cidTable is what `per connection` has learned: the upstream of each QUIC
// connection ID a client's Initial or a server's long-header reply carried.
// It outlives reloads in the cidTables UsagePool, keyed by the handler's
// identity, and holds addresses, not upstreams. An entry expires when it
// has not been used for its flow's idle timeout; the table holds at most
// maxConnectionIDs entries and learns no more while full.
type cidTable struct {
	mu sync.RWMutex
	m  map[cidKey]*cidEntry

	lengths atomic.Uint32 // bit n: a server chose a CID of n octets
	now     atomic.Int64  // unix nanos, updated by the janitor
	done    chan struct{} // closed by Destruct; ends the janitor
}

// cidKey is a connection ID as a map key: lookups copy the ID into it on
// the stack, so they allocate nothing.
type cidKey struct {
	n uint8
	b [quicwire.MaxConnIDLenV1]byte
}

type cidEntry struct {
	upstream addrKey
	ttl      int64        // nanoseconds
	used     atomic.Int64 // unix nanos of the last use, as of the janitor's clock
}

// addrKey is an upstream address as a map key that hashes faster than a
// netip.AddrPort, whose zone handle makes its hash field by field.
type addrKey struct {
	ip   [16]byte
	port uint16
}

func keyOf(a netip.AddrPort) addrKey {
	return addrKey{ip: a.Addr().As16(), port: a.Port()}
}

// maxConnectionIDs caps the entries of one table.
const maxConnectionIDs = 1 << 18

var cidTables = caddy.NewUsagePool()

// newCIDTable returns a table whose janitor expires entries until the last
// handler of its identity is cleaned up.
func newCIDTable() (caddy.Destructor, error) {
	t := &cidTable{m: make(map[cidKey]*cidEntry), done: make(chan struct{})}
	t.now.Store(time.Now().UnixNano())
	go t.janitor()
	return t, nil
}

// Destruct stops the janitor.
func (t *cidTable) Destruct() error {
	close(t.done)
	return nil
}

func (t *cidTable) janitor() {
	tick := time.NewTicker(sweepInterval)
	defer tick.Stop()
	for {
		select {
		case <-t.done:
			return
		case now := <-tick.C:
			t.now.Store(now.UnixNano())
			t.sweep(now.UnixNano())
		}
	}
}

// sweep drops the entries idle longer than their TTL as of now.
func (t *cidTable) sweep(now int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, e := range t.m {
		if now-e.used.Load() > e.ttl {
			delete(t.m, k)
		}
	}
}

// cidKeyOf returns cid as a key; ok is false for an empty or over-long CID.
func cidKeyOf(cid []byte) (k cidKey, ok bool) {
	if len(cid) == 0 || len(cid) > quicwire.MaxConnIDLenV1 {
		return k, false
	}
	k.n = uint8(len(cid))
	copy(k.b[:], cid)
	return k, true
}

// lookup returns the upstream learned for cid, marking it used.
func (t *cidTable) lookup(cid []byte) (addrKey, bool) {
	k, ok := cidKeyOf(cid)
	if !ok {
		return addrKey{}, false
	}
	t.mu.RLock()
	e := t.m[k]
	t.mu.RUnlock()
	if e == nil {
		return addrKey{}, false
	}
	if now := t.now.Load(); e.used.Load() != now {
		e.used.Store(now)
	}
	return e.upstream, true
}

// learn remembers that cid belongs to upstream for ttl after its last use.
// server says the server chose cid, so short headers may carry it.
func (t *cidTable) learn(cid []byte, upstream addrKey, ttl time.Duration, server bool) {
	k, ok := cidKeyOf(cid)
	if !ok {
		return
	}
	if server {
		for {
			old := t.lengths.Load()
			if old&(1<<k.n) != 0 || t.lengths.CompareAndSwap(old, old|1<<k.n) {
				break
			}
		}
	}
	t.mu.RLock()
	e := t.m[k]
	t.mu.RUnlock()
	if e != nil && e.upstream == upstream {
		e.used.Store(t.now.Load())
		return
	}
	e = &cidEntry{upstream: upstream, ttl: int64(ttl)}
	e.used.Store(t.now.Load())
	t.mu.Lock()
	if _, replace := t.m[k]; replace || len(t.m) < maxConnectionIDs {
		t.m[k] = e
	}
	t.mu.Unlock()
}

// shortLookup returns the upstream of a short-header packet b by the
// server-chosen CID lengths learned so far, shortest first.
func (t *cidTable) shortLookup(b []byte) (addrKey, bool) {
	for lengths := t.lengths.Load(); lengths != 0; lengths &= lengths - 1 {
		n := bits.TrailingZeros32(lengths)
		if len(b) < 1+n {
			break
		}
		if addr, ok := t.lookup(b[1 : 1+n]); ok {
			return addr, true
		}
	}
	return addrKey{}, false
}

// serverLen reports whether a server chose a CID of n octets.
func (t *cidTable) serverLen(n int) bool {
	return n <= quicwire.MaxConnIDLenV1 && t.lengths.Load()&(1<<n) != 0
}

// shortestServerLen is the shortest CID length a server chose, or 0.
func (t *cidTable) shortestServerLen() int {
	if l := t.lengths.Load(); l != 0 {
		return bits.TrailingZeros32(l)
	}
	return 0
}

// len is the number of entries.
func (t *cidTable) len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.m)
}

// Interface guards
var _ caddy.Destructor = (*cidTable)(nil)
