package stabilize

import (
	"slices"
	"sync"
)

// Reloads
//
// A config reload provisions the new handlers before it cleans up the old
// ones. Handlers with the same identity (granularity, selection policy, and
// whether they terminate QUIC) are one handler across configs: the new one inherits the old one's flow
// affinity, and its fastudp flows (see Cleanup). The identity leaves out the
// upstreams, so that adding or removing one keeps the others' flows; of
// several handlers of one identity, an old one's successor is the new one
// that shares the most upstreams with it.

// lineage holds the live handlers of each identity, oldest first.
var lineage = struct {
	sync.Mutex
	m map[string][]*Handler
}{m: make(map[string][]*Handler)}

// join completes h's identity (Provision began it with the policy), attaches
// its affinity table and records it.
func (h *Handler) join() {
	per := h.Per
	if per == "" {
		per = PerFlow
	}
	h.identity = "per=" + per + ";" + h.identity
	if h.QUIC != nil {
		h.identity = "quic;" + h.identity // never takes raw flows
	}
	if per != PerPacket {
		a, _, _ := affinities.LoadOrNew(h.identity, newAffinity)
		h.affinity = a.(*affinity)
	}
	if r, ok := h.router.(*perConnectionRouter); ok {
		s, _, _ := cidTables.LoadOrNew(h.identity, newCIDTableSet)
		r.tables = s.(*cidTableSet)
	}
	lineage.Lock()
	lineage.m[h.identity] = append(lineage.m[h.identity], h)
	lineage.Unlock()
}

// leave forgets h and returns its successor, to which its flows may move,
// or nil: of the live handlers of its identity in other configs, the one
// that shares the most upstreams with h, the newest of equals.
func (h *Handler) leave() *Handler {
	lineage.Lock()
	defer lineage.Unlock()
	hs := slices.DeleteFunc(lineage.m[h.identity], func(g *Handler) bool { return g == h })
	if len(hs) == 0 {
		delete(lineage.m, h.identity)
		return nil
	}
	lineage.m[h.identity] = hs
	var next *Handler
	best := 0
	for _, g := range hs {
		if g.ctx.Context == h.ctx.Context || g.ctx.Err() != nil {
			continue // the same config, or one that is going away
		}
		shared := 0
		for addr := range h.byAddr {
			if g.byAddr[addr] != nil {
				shared++
			}
		}
		if shared >= best && shared > 0 {
			next, best = g, shared
		}
	}
	return next
}
