package stabilize

import (
	"net/netip"
	"reflect"
	"slices"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
)

// Reloads
//
// A config reload provisions the new handlers before it cleans up the old
// ones. Handlers with the same identity (granularity, selection policy, and
// whether they terminate QUIC) are one handler across configs: the new one inherits the old one's flow
// affinity, and its fastudp flows (see Cleanup). The identity leaves out the
// upstreams, so that adding or removing one keeps the others' flows; of
// several handlers of one identity, an old one's successor on a listener
// is the new one that serves the listener and shares the most upstreams
// with it. A reload may give the listener a handler of another identity
// and the old identity to another listener: the flows then end, and the
// client's next datagram takes the listener's new route.

// lineage holds the live handlers of each identity, oldest first.
var lineage = struct {
	sync.Mutex
	m map[string][]*Handler
}{m: make(map[string][]*Handler)}

// join completes h's identity (Provision began it with the policy), attaches
// its affinity table, learns its listeners and records it.
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
	h.listens, h.listensKnown = serverListens(h.ctx)
	lineage.Lock()
	lineage.m[h.identity] = append(lineage.m[h.identity], h)
	lineage.Unlock()
}

// leave forgets h and returns the handlers to which its flows may move:
// the live handlers of its identity in other configs, oldest first.
func (h *Handler) leave() []*Handler {
	lineage.Lock()
	defer lineage.Unlock()
	hs := slices.DeleteFunc(lineage.m[h.identity], func(g *Handler) bool { return g == h })
	if len(hs) == 0 {
		delete(lineage.m, h.identity)
		return nil
	}
	lineage.m[h.identity] = hs
	return slices.DeleteFunc(slices.Clone(hs), func(g *Handler) bool {
		return g.ctx.Context == h.ctx.Context || g.ctx.Err() != nil // the same config, or one that is going away
	})
}

// successor returns, of next (leave's), the handler to which h's flows on
// the fastudp listener at listener may move, or nil: of those that serve
// the listener, the one that shares the most upstreams with h, the newest
// of equals.
func (h *Handler) successor(next []*Handler, listener netip.AddrPort) *Handler {
	var to *Handler
	best := 0
	for _, g := range next {
		if !g.serves(FastNetwork, listener) {
			continue
		}
		shared := 0
		for addr := range h.byAddr {
			if g.byAddr[addr] != nil {
				shared++
			}
		}
		if shared >= best && shared > 0 {
			to, best = g, shared
		}
	}
	return to
}

// serves reports whether caddy-l4 may route flows of the listener at ap on
// network to h: whether the layer4 server whose routes hold h listens
// there. Matchers in the routes may still send some of its clients
// elsewhere. A handler whose server is unknown (serverListens) is taken to
// serve every listener.
func (h *Handler) serves(network string, ap netip.AddrPort) bool {
	if !h.listensKnown {
		return true
	}
	for _, l := range h.listens {
		if listensAt(l, network, ap) {
			return true
		}
	}
	return false
}

// serverListens returns the listen addresses of the layer4 server whose
// routes hold the handler that ctx provisions, or false if it cannot tell.
// caddy-l4 v0.1.2 compiles a server's routes into closures, so a handler
// cannot find itself in them; but it provisions its servers one at a time,
// each by parsing its listen addresses, then provisioning its routes (and
// so the handler), then compiling them: the server being provisioned is
// the one with parsed addresses and no compiled route yet.
func serverListens(ctx caddy.Context) ([]string, bool) {
	var app *layer4.App
	for _, m := range ctx.Modules() {
		if a, ok := m.(*layer4.App); ok {
			app = a
		}
	}
	if app == nil {
		return nil, false // not in a layer4 server's routes
	}
	var found *layer4.Server
	for _, srv := range app.Servers {
		v := reflect.ValueOf(srv).Elem()
		addrs, compiled := serverAddrsField.of(v), serverRouteField.of(v)
		if addrs.Kind() != reflect.Slice || compiled.Kind() != reflect.Interface {
			return nil, false // another caddy-l4
		}
		if addrs.IsNil() || !compiled.IsNil() {
			continue // not begun, or done
		}
		if found != nil {
			return nil, false
		}
		found = srv
	}
	if found == nil {
		return nil, false
	}
	return slices.Clone(found.Listen), true
}
