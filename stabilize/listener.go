package stabilize

import (
	"net"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// listenerOf returns the listener a caddy-l4 UDP flow arrived on: the
// fastudp front, and the listener's UDP socket, through which replies reach
// the client without caddy-l4's blocking cx.Write. caddy-l4's per-flow
// packetConn embeds the listener but does not expose it, so it is read by
// reflection once per flow; Caddy's own wrappers offer Unwrap. Either result
// is nil when the listener is something else.
func listenerOf(cx *layer4.Connection) (*fastudp.Front, *net.UDPConn) {
	v := reflect.ValueOf(cx.Conn)
	if v.Kind() == reflect.Pointer {
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return nil, nil
	}
	f := packetConnField.of(v)
	if !f.IsValid() || !f.CanInterface() {
		return nil, nil
	}
	pc, _ := f.Interface().(net.PacketConn)
	var front *fastudp.Front
	for pc != nil {
		switch c := pc.(type) {
		case *net.UDPConn:
			return front, c
		case *fastudp.Front:
			front, pc = c, c.Unwrap()
		case interface{ Unwrap() net.PacketConn }:
			pc = c.Unwrap()
		default:
			return front, nil
		}
	}
	return front, nil
}

// listenerClosed reports whether a listener that listenerOf found is
// closed: its caddy-l4 server has stopped, at a reload or on shutdown.
func listenerClosed(front *fastudp.Front, conn *net.UDPConn) bool {
	switch {
	case front != nil:
		return front.Closed()
	case conn != nil:
		rc, err := conn.SyscallConn()
		return err != nil || rc.Control(func(uintptr) {}) != nil
	}
	return false
}

// closeNoticeWait is how long, past the listener's idle timeout, a stopped
// server's notice channel is drained after its last notice.
const closeNoticeWait = 10 * time.Second

// closeDrains are the notice channels that a drainer watches.
var closeDrains sync.Map // chan string → struct{}

// drainCloseNotices works around caddy-l4 v0.1.2 (mholt/caddy-l4#462): a
// flow's packetConn sends a notice to its server's loop at caddy-l4's idle
// timeout and on Close, and once the loop has stopped, with the channel
// full, the sending goroutine would park for good, with the flow's memory.
// Senders already waiting when the loop stops park too, as do flows that
// end after it. So a goroutine per server's channel, found by reflection on
// its first flow, waits for the config to end and, if the listener has
// closed (the loop is then gone or going; a socket the next config shares,
// as Caddy's off Unix, is left alone), takes every notice until none has
// come for the idle timeout and closeNoticeWait: a flow still reading then
// has ended.
func (h *Handler) drainCloseNotices(cx *layer4.Connection) {
	ch := closeNotices(cx)
	if ch == nil {
		return
	}
	if _, watched := closeDrains.Load(ch); watched {
		return
	}
	front, conn := listenerOf(cx)
	if front == nil && conn == nil {
		return
	}
	if _, watched := closeDrains.LoadOrStore(ch, struct{}{}); watched {
		return
	}
	quiet := h.listenerIdleTimeout(listenerNetwork(front), cx.LocalAddr()) + closeNoticeWait
	go func() {
		defer closeDrains.Delete(ch)
		<-h.ctx.Done() // after caddy-l4 has closed the config's listeners
		if !listenerClosed(front, conn) {
			return
		}
		t := time.NewTimer(quiet)
		defer t.Stop()
		for {
			select {
			case <-ch:
				t.Reset(quiet)
			case <-t.C:
				return
			}
		}
	}()
}

// closeNotices is the channel of caddy-l4's per-flow packetConn that its
// Close sends the flow's notice on, or nil where cx is something else.
func closeNotices(cx *layer4.Connection) <-chan string {
	v := reflect.ValueOf(cx.Conn)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		return nil
	}
	f := closeChField.of(v.Elem())
	if !f.IsValid() || f.Type() != reflect.TypeFor[chan string]() {
		return nil
	}
	return *(*chan string)(unsafe.Pointer(f.UnsafeAddr()))
}

// warnedListenerBuffer: a udp/ listener's socket buffer could not be
// raised (growListener); warned once per process.
var warnedListenerBuffer atomic.Bool

// growListener raises the receive and send buffers of a udp/ listener's
// socket, which caddy-l4 opens with the system's default (about 208 KiB),
// to a fastudp socket's, so that a burst of new flows, or the datagrams
// that arrive while caddy-l4 sets flows up, are not dropped by the kernel
// (a larger buffer, as QUIC termination's, stays). The first flow of each
// handler on the listener calls it (listenerInfo). Where the system caps
// the buffer (net.core.rmem_max without CAP_NET_ADMIN), it warns once.
func (h *Handler) growListener(out *net.UDPConn, local net.Addr) {
	got, err := udpio.GrowBuffers(out, fastudp.SocketBuffer)
	if (err == nil && got >= fastudp.SocketBuffer) || warnedListenerBuffer.Swap(true) {
		return
	}
	h.logger.Warn("the udp/ listener's receive buffer stays smaller than fastudp's: the kernel may drop a burst of datagrams; raise net.core.rmem_max",
		zap.Stringer("listener", local), zap.Int("receive_buffer", got), zap.Int("wanted", fastudp.SocketBuffer), zap.Error(err))
}

// listenerNetwork is the network of a listener that listenerOf found.
func listenerNetwork(front *fastudp.Front) string {
	if front != nil {
		return FastNetwork
	}
	return "udp"
}

// defaultIdleTimeout is caddy-l4's default idle timeout of UDP flows.
const defaultIdleTimeout = 30 * time.Second

// listenerIdleTimeout is the idle timeout of the layer4 server whose
// listener on network (udp, udp4 and udp6 are one) has local's address:
// caddy-l4 ends a flow idle for that long. Handle tells an empty datagram
// from the end of a flow by it, so when no listener matches it returns the
// shortest idle timeout of all, which may end a flow early but never reads
// past its end.
func (h *Handler) listenerIdleTimeout(network string, local net.Addr) time.Duration {
	idle, _ := h.serverIdleTimeout(network, addrPort(local))
	return idle
}

// serverIdleTimeout is listenerIdleTimeout for the address ap, and whether
// a listener of h's config matched it.
func (h *Handler) serverIdleTimeout(network string, ap netip.AddrPort) (time.Duration, bool) {
	return serverIdleTimeoutOf(h.ctx, network, ap)
}

// serverIdleTimeoutOf is serverIdleTimeout in the config of ctx.
func serverIdleTimeoutOf(ctx caddy.Context, network string, ap netip.AddrPort) (time.Duration, bool) {
	if ctx.Context == nil {
		return defaultIdleTimeout, false // no config runs
	}
	app, err := ctx.AppIfConfigured("layer4")
	if err != nil {
		return defaultIdleTimeout, false
	}
	shortest, found := time.Duration(0), time.Duration(0)
	for _, srv := range app.(*layer4.App).Servers {
		idle := time.Duration(srv.IdleTimeout)
		if idle <= 0 {
			idle = defaultIdleTimeout
		}
		if shortest == 0 || idle < shortest {
			shortest = idle
		}
		for _, l := range srv.Listen {
			if listensAt(l, network, ap) && (found == 0 || idle < found) {
				found = idle
			}
		}
	}
	switch {
	case found > 0:
		return found, true
	case shortest > 0:
		return shortest, false
	}
	return defaultIdleTimeout, false
}

// listensAt reports whether l, a layer4 server's listen address, is the
// listener on network (udp, udp4 and udp6 are one) at ap. Placeholders in
// l are replaced as caddy-l4 replaces them.
func listensAt(l, network string, ap netip.AddrPort) bool {
	na, err := caddy.ParseNetworkAddress(caddy.NewReplacer().ReplaceAll(l, ""))
	if err != nil || strings.TrimRight(na.Network, "46") != network ||
		uint(ap.Port()) < na.StartPort || uint(ap.Port()) > na.EndPort {
		return false
	}
	ip, err := netip.ParseAddr(na.Host)
	return err != nil || ip.IsUnspecified() || ip.Unmap() == ap.Addr().Unmap()
}
