package stabilize

import (
	"net/netip"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// affinity remembers the upstream of every `per flow` client, so that a
// handler provisioned by a config reload keeps each flow on its upstream.
// It outlives reloads in the affinities UsagePool, keyed by the handler's
// identity. It holds addresses only, never flows or handlers, so an old
// config's handler is not kept reachable. An entry belongs to a live flow,
// or is orphaned when its flow ended in a reload; an orphan lives for its
// flow's idle timeout, and at most maxOrphans of them are kept.
type affinity struct {
	mu      sync.Mutex
	m       map[affinityKey]affinityEntry
	orphans int
	done    chan struct{} // closed by Destruct; ends the janitor
}

// affinityKey names a flow: the listener it arrived on and the client.
type affinityKey struct {
	listener, client netip.AddrPort
}

type affinityEntry struct {
	upstream netip.AddrPort
	owner    uint64 // the live flow's id; 0 for an orphan
	expires  int64  // an orphan's end, in unix nanoseconds
}

// maxOrphans bounds the orphaned entries of one table.
const maxOrphans = 1 << 16

var affinities = caddy.NewUsagePool()

// sweepInterval is how often expired orphans are dropped.
const sweepInterval = time.Second

// newAffinity returns a table whose janitor drops expired orphans until
// the last handler of its identity is cleaned up.
func newAffinity() (caddy.Destructor, error) {
	a := &affinity{m: make(map[affinityKey]affinityEntry), done: make(chan struct{})}
	go a.janitor()
	return a, nil
}

// Destruct stops the janitor.
func (a *affinity) Destruct() error {
	close(a.done)
	return nil
}

func (a *affinity) janitor() {
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-a.done:
			return
		case now := <-t.C:
			a.mu.Lock()
			if a.orphans > 0 {
				a.sweep(now.UnixNano())
			}
			a.mu.Unlock()
		}
	}
}

// lookup returns the upstream remembered for k.
func (a *affinity) lookup(k affinityKey) (netip.AddrPort, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.m[k]
	if ok && e.owner == 0 && time.Now().UnixNano() > e.expires {
		return netip.AddrPort{}, false
	}
	return e.upstream, ok
}

// set remembers that flow owner of k is on upstream.
func (a *affinity) set(k affinityKey, upstream netip.AddrPort, owner uint64) {
	a.mu.Lock()
	if e, ok := a.m[k]; ok && e.owner == 0 {
		a.orphans--
	}
	a.m[k] = affinityEntry{upstream: upstream, owner: owner}
	a.mu.Unlock()
}

// release ends owner's hold on k, unless a newer flow took k over. When the
// flow ended in a reload (orphan), the entry stays for ttl, for the next
// config's flow of the client; else it goes.
func (a *affinity) release(k affinityKey, owner uint64, orphan bool, ttl time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.m[k]
	if !ok || e.owner != owner {
		return
	}
	if !orphan {
		delete(a.m, k)
		return
	}
	now := time.Now().UnixNano()
	if a.orphans >= maxOrphans {
		a.sweep(now)
		if a.orphans >= maxOrphans {
			delete(a.m, k)
			return
		}
	}
	a.m[k] = affinityEntry{upstream: e.upstream, expires: now + int64(ttl)}
	a.orphans++
}

// sweep drops expired orphans. a.mu is held.
func (a *affinity) sweep(now int64) {
	for k, e := range a.m {
		if e.owner == 0 && now > e.expires {
			delete(a.m, k)
			a.orphans--
		}
	}
}

// len is the number of entries, live and orphaned.
func (a *affinity) len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.m)
}

// Interface guards
var _ caddy.Destructor = (*affinity)(nil)
