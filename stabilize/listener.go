package stabilize

import (
	"net"
	"reflect"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
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
	f := v.FieldByName("PacketConn")
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
// listener on network has local's port: caddy-l4 ends a flow idle for that
// long.
func (h *Handler) listenerIdleTimeout(network string, local net.Addr) time.Duration {
	ua, ok := local.(*net.UDPAddr)
	if !ok {
		return defaultIdleTimeout
	}
	if app, err := h.ctx.AppIfConfigured("layer4"); err == nil {
		for _, srv := range app.(*layer4.App).Servers {
			for _, l := range srv.Listen {
				na, err := caddy.ParseNetworkAddress(l)
				if err == nil && na.Network == network && uint(ua.Port) >= na.StartPort && uint(ua.Port) <= na.EndPort {
					if srv.IdleTimeout > 0 {
						return time.Duration(srv.IdleTimeout)
					}
					return defaultIdleTimeout
				}
			}
		}
	}
	return defaultIdleTimeout
}
