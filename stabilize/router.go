package stabilize

// router is a granularity: it decides which upstream each datagram of a
// flow goes to, asking the policy only among the candidates that
// Handler.candidates allows. Provision chooses one per handler.
type router interface {
	// route returns the upstream for b, fl's next datagram, or nil to drop
	// it. fl.mu is held.
	route(fl *Flow, b []byte) *Upstream
}

// perPacketRouter asks the policy for every datagram.
type perPacketRouter struct{ h *Handler }

func (r perPacketRouter) route(fl *Flow, _ []byte) *Upstream {
	pool, _ := r.h.candidates()
	if pool == nil {
		return nil
	}
	return r.h.selector.Select(pool, &fl.req)
}

// perFlowRouter asks the policy on a flow's first datagram and keeps the
// flow on that upstream while it is healthy. When every upstream is down
// and the handler fails open, a flow stays where it is.
type perFlowRouter struct{ h *Handler }

func (r perFlowRouter) route(fl *Flow, _ []byte) *Upstream {
	u := r.h.stick(fl.upstream, &fl.req)
	if u != nil && u != fl.upstream {
		fl.assign(u)
	}
	return u
}

// stick is the per flow rule, for a flow or a QUIC connection on u (nil
// before its first pick): u while it is healthy, else the policy's pick
// for req among the candidates; when every upstream is down and h fails
// open, u stays. It returns nil when no upstream can take the flow.
func (h *Handler) stick(u *Upstream, req *Request) *Upstream {
	if u != nil && u.healthy() {
		return u
	}
	pool, allDown := h.candidates()
	switch {
	case pool == nil:
		return nil
	case allDown && u != nil:
		return u
	}
	return h.selector.Select(pool, req)
}

// Interface guards
var (
	_ router = perPacketRouter{}
	_ router = perFlowRouter{}
)
