package stabilize

import (
	"slices"
	"sync"
)

// Reloads
//
// A config reload provisions the new handlers before it cleans up the old
// ones. Handlers with the same identity (granularity and selection policy)
// are one handler across configs: the new one inherits the old one's flow
// affinity, and its fastudp flows (see Cleanup). The identity leaves out the
// upstreams, so that adding or removing one keeps the others' flows.

// lineage holds the live handlers of each identity, oldest first.
var lineage = struct {
	sync.Mutex
	m map[string][]*Handler
}{m: make(map[string][]*Handler)}

// join sets h's identity, attaches its affinity table and records it.
func (h *Handler) join() {
	_, perFlow := h.router.(perFlowRouter)
	h.identity = "per=packet;selection=" + string(h.LoadBalancing.SelectionPolicyRaw)
	if perFlow {
		h.identity = "per=flow;selection=" + string(h.LoadBalancing.SelectionPolicyRaw)
		a, _ := affinities.LoadOrStore(h.identity, newAffinity())
		h.affinity = a.(*affinity)
	}
	lineage.Lock()
	lineage.m[h.identity] = append(lineage.m[h.identity], h)
	lineage.Unlock()
}

// leave forgets h and returns the newest live handler of its identity, to
// which its flows may move, or nil.
func (h *Handler) leave() *Handler {
	lineage.Lock()
	defer lineage.Unlock()
	hs := slices.DeleteFunc(lineage.m[h.identity], func(g *Handler) bool { return g == h })
	if len(hs) == 0 {
		delete(lineage.m, h.identity)
		return nil
	}
	lineage.m[h.identity] = hs
	return hs[len(hs)-1]
}
