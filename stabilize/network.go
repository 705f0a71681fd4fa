package stabilize

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
)

// FastNetwork is the network of stabilize's own UDP listener: listen on
// `fastudp/:5000` instead of `udp/:5000`. Its socket (package fastudp) reads
// datagrams in batches and delivers the datagrams of established stabilize
// flows straight to them, without caddy-l4's per-datagram dispatch; replies
// go out through the same socket. caddy-l4 still matches and routes each new
// flow. The socket outlives config reloads while any config listens on it,
// and so do its flows whose handler has a successor (see Cleanup).
const FastNetwork = "fastudp"

func init() {
	caddy.RegisterNetwork(FastNetwork, listenFast)
}

func listenFast(ctx context.Context, network, host, portRange string, portOffset uint, _ net.ListenConfig) (any, error) {
	start, _, _ := strings.Cut(portRange, "-")
	port, err := strconv.ParseUint(start, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("%s: port %q: %w", network, portRange, err)
	}
	front, err := fastudp.Listen(net.JoinHostPort(host, strconv.FormatUint(port+uint64(portOffset), 10)), fastUDPReaders(ctx))
	if err != nil {
		return nil, err
	}
	front.SetLogger(caddy.Log().Named("layer4.fastudp"))
	// caddy-l4 closes its listeners when its config stops, but not those
	// of a config that fails to start: that one's front closes with its
	// config too, and the socket goes back to the running config's
	// readers. A second Close does nothing.
	context.AfterFunc(ctx, func() { _ = front.Close() })
	return front, nil
}
