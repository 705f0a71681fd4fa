package stabilize

import (
	"encoding/binary"
	"hash/maphash"
	"math/bits"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"golang.org/x/sys/cpu"

	"github.com/stabilize-lb/caddy-stabilize/internal/quicwire"
)

// cidTable is what `per connection` has learned on one listener: the
// upstream of each QUIC connection ID a client's Initial or a server's
// long-header reply carried, and of each client connection (address, port
// and SCID) the policy picked for.
// It outlives reloads in a cidTableSet, and holds addresses, not upstreams.
// An entry expires when it has not been used for its flow's idle timeout;
// the table holds at most maxConnectionIDs entries and learns no more while
// full.
//
// The entries are spread over shards by a keyed hash, each with its own
// lock, so that the janitor's sweep holds a write lock over the expired
// entries of one shard at a time: a lookup on a fastudp reader waits for
// the deletion of about maxConnectionIDs/cidShards entries at most, not
// for a walk of the table.
type cidTable struct {
	shards [cidShards]cidShard
	seed   maphash.Seed
	n      atomic.Int64 // entries
	max    int64        // the cap: maxConnectionIDs when the table was made

	lengths atomic.Uint32 // bit n: a server chose a CID of n octets
	now     atomic.Int64  // unix nanos, updated by the janitor
	refs    int           // handlers holding the table; under its set's mu
}

// cidShards is the number of shards of a table: at the cap, one holds
// about 1,000 entries.
const cidShards = 256

// cidShard is a table's share of the entries, on cache lines of its own.
type cidShard struct {
	mu sync.RWMutex
	m  map[cidKey]*cidEntry
	_  cpu.CacheLinePad
}

// cidKey is a connection ID as a map key: lookups copy the ID into it on
// the stack, so they allocate nothing.
type cidKey struct {
	n      uint8
	client bool // a client connection's: b holds a hash of its address, port and SCID
	b      [quicwire.MaxConnIDLenV1]byte
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

// maxConnectionIDs caps the entries of one table; a variable for tests.
var maxConnectionIDs = 1 << 18

// cidTableSet is the tables of the `per connection` handlers of one
// identity, one per listener address, so that a flood of new connections
// on one listener fills its own table only, never another listener's. It
// outlives reloads in the cidTables UsagePool, keyed by the identity. A
// handler holds the table of each listener it has had a flow on until it
// is cleaned up; a table no handler holds stays while it has entries, for
// the next config's handler, and goes once they have expired.
type cidTableSet struct {
	mu     sync.Mutex
	tables map[netip.AddrPort]*cidTable
	swept  []*cidTable   // the janitor's
	done   chan struct{} // closed by Destruct; ends the janitor
}

var cidTables = caddy.NewUsagePool()

// newCIDTableSet returns a set whose janitor expires the entries of its
// tables until the last handler of its identity is cleaned up.
func newCIDTableSet() (caddy.Destructor, error) {
	s := &cidTableSet{tables: make(map[netip.AddrPort]*cidTable), done: make(chan struct{})}
	go s.janitor()
	return s, nil
}

// Destruct stops the janitor.
func (s *cidTableSet) Destruct() error {
	close(s.done)
	return nil
}

// acquire returns the table of listener, made if there is none, and
// counts a holder; hold says whether to count one.
func (s *cidTableSet) acquire(listener netip.AddrPort, hold bool) *cidTable {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tables[listener]
	if t == nil {
		t = newCIDTable()
		s.tables[listener] = t
	}
	if hold {
		t.refs++
	}
	return t
}

// release counts a holder of t less.
func (s *cidTableSet) release(t *cidTable) {
	s.mu.Lock()
	t.refs--
	s.mu.Unlock()
}

// each calls fn with each table of the set and its listener, under the
// set's lock.
func (s *cidTableSet) each(fn func(netip.AddrPort, *cidTable)) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for l, t := range s.tables {
		fn(l, t)
	}
}

func (s *cidTableSet) janitor() {
	tick := time.NewTicker(sweepInterval)
	defer tick.Stop()
	for {
		select {
		case <-s.done:
			return
		case now := <-tick.C:
			s.sweep(now.UnixNano())
		}
	}
}

// sweep expires the entries of every table as of now, and drops the
// tables that no handler holds and that hold nothing. Only the set's
// janitor calls it: two sweeps at once are not safe.
func (s *cidTableSet) sweep(now int64) {
	s.mu.Lock()
	for _, t := range s.tables {
		s.swept = append(s.swept, t)
	}
	s.mu.Unlock()
	for _, t := range s.swept {
		t.now.Store(now)
		t.sweep(now)
	}
	clear(s.swept)
	s.swept = s.swept[:0]
	s.mu.Lock()
	for l, t := range s.tables {
		if t.refs == 0 && t.len() == 0 {
			delete(s.tables, l)
		}
	}
	s.mu.Unlock()
}

// newCIDTable returns an empty table.
func newCIDTable() *cidTable {
	t := &cidTable{seed: maphash.MakeSeed(), max: int64(maxConnectionIDs)}
	for i := range t.shards {
		t.shards[i].m = make(map[cidKey]*cidEntry)
	}
	t.now.Store(time.Now().UnixNano())
	return t
}

// sweep drops the entries idle longer than their TTL as of now, one shard
// at a time: it finds them under the shard's read lock, which lookups
// share, and takes the write lock only to delete them. It returns the most
// entries it deleted under one write lock.
func (t *cidTable) sweep(now int64) (held int) {
	expired := func(e *cidEntry) bool { return e != nil && now-e.used.Load() > e.ttl }
	var keys []cidKey
	for i := range t.shards {
		s := &t.shards[i]
		keys = keys[:0]
		s.mu.RLock()
		for k, e := range s.m {
			if expired(e) {
				keys = append(keys, k)
			}
		}
		s.mu.RUnlock()
		if len(keys) == 0 {
			continue
		}
		held = max(held, len(keys))
		s.mu.Lock()
		for _, k := range keys {
			if expired(s.m[k]) { // unless used or learned again meanwhile
				delete(s.m, k)
				t.n.Add(-1)
			}
		}
		s.mu.Unlock()
	}
	return held
}

// shard returns the shard of k.
func (t *cidTable) shard(k *cidKey) *cidShard {
	return &t.shards[maphash.Bytes(t.seed, k.b[:k.n])%cidShards]
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

// clientKey returns the key of the connection of client with SCID scid; ok
// is false for an over-long SCID.
func (t *cidTable) clientKey(client netip.AddrPort, scid []byte) (k cidKey, ok bool) {
	if len(scid) > quicwire.MaxConnIDLenV1 {
		return k, false
	}
	var b [18 + quicwire.MaxConnIDLenV1]byte
	a := keyOf(client)
	copy(b[:16], a.ip[:])
	b[16], b[17] = byte(a.port>>8), byte(a.port)
	n := copy(b[18:], scid)
	k.n, k.client = 8, true
	binary.LittleEndian.PutUint64(k.b[:], maphash.Bytes(t.seed, b[:18+n]))
	return k, true
}

// lookup returns the upstream learned for cid, marking it used.
func (t *cidTable) lookup(cid []byte) (addrKey, bool) {
	return t.find(cidKeyOf(cid))
}

// find returns the upstream of k, if ok, marking it used.
func (t *cidTable) find(k cidKey, ok bool) (addrKey, bool) {
	if !ok {
		return addrKey{}, false
	}
	s := t.shard(&k)
	s.mu.RLock()
	e := s.m[k]
	s.mu.RUnlock()
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
	t.put(k, upstream, ttl)
}

// put remembers that k belongs to upstream for ttl after its last use,
// unless the table is full.
func (t *cidTable) put(k cidKey, upstream addrKey, ttl time.Duration) {
	s := t.shard(&k)
	s.mu.RLock()
	e := s.m[k]
	s.mu.RUnlock()
	if e != nil && e.upstream == upstream {
		e.used.Store(t.now.Load())
		return
	}
	e = &cidEntry{upstream: upstream, ttl: int64(ttl)}
	e.used.Store(t.now.Load())
	s.mu.Lock()
	if _, replace := s.m[k]; replace {
		s.m[k] = e
	} else if t.n.Add(1) <= t.max {
		s.m[k] = e
	} else {
		t.n.Add(-1) // full
	}
	s.mu.Unlock()
}

// shortLookup returns the upstream of a short-header packet b by the
// server-chosen CID lengths learned so far, shortest first.
func (t *cidTable) shortLookup(b []byte) (addrKey, bool) {
	for lengths := t.lengths.Load(); lengths != 0; lengths &= lengths - 1 {
		n := bits.TrailingZeros32(lengths)
		if len(b) < 1+n {
			break
		}
		if addr, ok := t.find(cidKeyOf(b[1 : 1+n])); ok {
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
	return int(t.n.Load())
}

// full reports whether the table learns nothing more.
func (t *cidTable) full() bool {
	return t.n.Load() >= t.max
}

// Interface guards
var _ caddy.Destructor = (*cidTableSet)(nil)
