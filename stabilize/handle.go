package stabilize

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/mholt/caddy-l4/layer4"
)

// Handle balances one client flow. It reads the flow until caddy-l4 ends it
// with io.EOF at its idle timeout, and never blocks that loop on an
// upstream, so one slow or dead upstream cannot stall the listener. On a
// fastudp listener it returns sooner: once the flow's datagrams bypass
// caddy-l4, the socket keeps the flow.
func (h *Handler) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	client := addrPort(cx.RemoteAddr())
	if !client.IsValid() {
		return fmt.Errorf("stabilize handles UDP only, not %s", cx.RemoteAddr().Network())
	}
	h.drainCloseNotices(cx) // listener.go
	if h.QUIC != nil {
		return h.handleQUIC(cx) // quic_transport.go
	}
	fl, refused := h.newFlow(cx, client)
	if fl == nil {
		h.refuse(cx, refused)
		return nil
	}
	fl.handling.Store(true)
	defer fl.handling.Store(false)
	for first := true; ; first = false {
		h.readDeadline(cx, fl.fast != nil, first)
		// Wait for a datagram without holding a buffer: a zero-length read
		// returns once one has arrived and leaves it for the next read.
		start := time.Now()
		_, err := cx.Read(nil)
		waited := time.Since(start)
		if emptyDatagram(err, waited, fl.idle()) {
			fl.forward(nil, false)
			continue
		}
		if err != nil {
			if fl.handler() != h {
				// Moved to the next config's handler: the fast socket
				// feeds it now.
				fl.releaseConn()
				return nil
			}
			if fl.fast != nil && !h.closing.Load() && fl.detach() {
				return nil // the flow goes on, bypassing caddy-l4
			}
			fl.closeFor(h) // unless a reload has just moved it on
			if errors.Is(err, io.EOF) || h.closing.Load() {
				return nil
			}
			return fmt.Errorf("reading client flow: %w", err)
		}
		h.forwardNext(fl, cx)
	}
}

// readDeadline sets the deadline of Handle's next wait for a datagram of
// cx. On a fast socket (handoff) it is fastHandoff away: once the flow is
// registered, its datagrams bypass caddy-l4, so nothing more can queue up
// for this Handle. Once h is closing it is past, except for the flow's
// first datagram: Cleanup wakes the Handle calls it finds, but this one may
// have started after it looked, or begun waiting after the wake; it ends
// now, not at caddy-l4's idle timeout on a listener that has closed. The
// hand-off is set before closing is looked at, and Cleanup sets closing
// before it wakes, so a wake always wins over a hand-off.
func (h *Handler) readDeadline(cx *layer4.Connection, handoff, first bool) {
	if handoff {
		_ = cx.SetReadDeadline(time.Now().Add(fastHandoff))
	}
	if !first && h.closing.Load() {
		_ = cx.SetReadDeadline(time.Unix(1, 0))
	}
}

// emptyDatagram tells an empty datagram from the end of a flow: caddy-l4
// reports both as io.EOF, the first when it arrives, the second once a read
// has waited for the idle timeout.
func emptyDatagram(err error, waited, idleTimeout time.Duration) bool {
	return err == io.EOF && waited < idleTimeout
}

// refuse reads a refused flow until caddy-l4 ends it, so the listener never
// blocks on it, and drops each of its datagrams, counted as reason. Cleanup
// ends it sooner: at caddy-l4's idle timeout after its server stopped, the
// read would park on a notice nobody takes (mholt/caddy-l4#462).
func (h *Handler) refuse(cx *layer4.Connection, reason dropReason) {
	h.mu.Lock()
	if h.closing.Load() {
		h.mu.Unlock()
		return
	}
	if h.refusing == nil {
		h.refusing = make(map[*layer4.Connection]struct{})
	}
	h.refusing[cx] = struct{}{}
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.refusing, cx)
		h.mu.Unlock()
	}()
	front, _ := listenerOf(cx)
	idle := h.listenerIdleTimeout(listenerNetwork(front), cx.LocalAddr())
	for {
		// Wait without a buffer, as Handle does, and take one only to
		// consume the datagram: a flood of refused flows holds none.
		start := time.Now()
		_, err := cx.Read(nil)
		if err == nil {
			buf := datagramPool.Get().(*[maxProxyHeader + ListenerBufferSize]byte)
			_, _ = cx.Read(buf[:ListenerBufferSize])
			datagramPool.Put(buf)
		} else if !emptyDatagram(err, time.Since(start), idle) {
			return
		}
		h.drop(reason)
	}
}

// forwardNext reads the datagram waiting in cx into a pooled buffer and
// forwards it.
func (h *Handler) forwardNext(fl *Flow, cx *layer4.Connection) {
	buf := datagramPool.Get().(*[maxProxyHeader + ListenerBufferSize]byte)
	defer datagramPool.Put(buf)
	n, err := cx.Read(buf[:ListenerBufferSize])
	if err != nil {
		return // the next read reports it
	}
	// A fast socket delivers only whole datagrams to caddy-l4.
	fl.forward(buf[:n], n == ListenerBufferSize && fl.fast == nil)
}

// datagramPool holds buffers for one client datagram and its PROXY header.
var datagramPool = sync.Pool{New: func() any { return new([maxProxyHeader + ListenerBufferSize]byte) }}

// fastHandoff is how long Handle waits for datagrams of a flow on a fast
// socket before it leaves the flow to the socket.
const fastHandoff = 2 * time.Second
