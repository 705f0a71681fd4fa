package stabilize

import (
	"net/netip"
	"sync"

	"github.com/caddyserver/caddy/v2"
)

// affinity remembers the upstream of every `per flow` client, so that a
// handler provisioned by a config reload keeps each flow on its upstream.
// It outlives reloads in the affinities UsagePool, keyed by the handler's
// identity (its granularity and selection policy, not its upstreams).
type affinity struct {
	mu sync.Mutex
	m  map[affinityKey]affinityEntry
}

// affinityKey names a flow: the listener it arrived on and the client.
type affinityKey struct {
	listener, client netip.AddrPort
}

type affinityEntry struct {
	upstream netip.AddrPort
	owner    *Flow // the flow that set the entry
}

var affinities = caddy.NewUsagePool()

// lookup returns the upstream remembered for k.
func (a *affinity) lookup(k affinityKey) (netip.AddrPort, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.m[k]
	return e.upstream, ok
}

// set remembers that fl's flow is on upstream.
func (a *affinity) set(k affinityKey, upstream netip.AddrPort, fl *Flow) {
	a.mu.Lock()
	a.m[k] = affinityEntry{upstream: upstream, owner: fl}
	a.mu.Unlock()
}

// forget drops k if fl still owns it; a flow of a newer handler instance
// may have taken it over.
func (a *affinity) forget(k affinityKey, fl *Flow) {
	a.mu.Lock()
	if a.m[k].owner == fl {
		delete(a.m, k)
	}
	a.mu.Unlock()
}
