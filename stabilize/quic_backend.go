package stabilize

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"

	"github.com/caddyserver/caddy/v2"
	"github.com/quic-go/quic-go"
)

// Backend connections
//
// Every backend connection of the process is dialed from one
// quic.Transport on one UDP socket, which quic-go demultiplexes by
// connection ID: a dial opens no socket and starts no goroutine for it.
// The transport lives in a UsagePool, held by every handler with quic/
// upstreams and by every relayed connection, so that it outlives reloads
// with the connections on it.

// backendTransports holds the transport of the backend connections.
var backendTransports = caddy.NewUsagePool()

// backendTransportKey is its key in backendTransports.
const backendTransportKey = "quic-backends"

// backendTransport is the quic.Transport of the backend connections.
type backendTransport struct {
	tr *quic.Transport
}

// acquireBackendTransport returns the transport of the backend
// connections, opening it for the first handler; releaseBackendTransport
// lets it go.
func acquireBackendTransport() (*backendTransport, error) {
	v, _, err := backendTransports.LoadOrNew(backendTransportKey, func() (caddy.Destructor, error) {
		// A wildcard socket: IPv4 and IPv6 upstreams alike, as
		// quic.DialAddr's.
		conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4zero})
		if err != nil {
			return nil, fmt.Errorf("the socket of backend QUIC connections: %w", err)
		}
		// 8-byte connection IDs: quic-go does not check a new dial's ID
		// against the live ones on a shared transport, and with 4 bytes
		// a busy balancer would see collisions.
		return &backendTransport{tr: &quic.Transport{Conn: conn, ConnectionIDLength: 8}}, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*backendTransport), nil
}

func releaseBackendTransport() { _, _ = backendTransports.Delete(backendTransportKey) }

// Destruct closes the transport, its connections and its socket.
func (b *backendTransport) Destruct() error {
	err := b.tr.Close()
	if cerr := b.tr.Conn.Close(); err == nil {
		err = cerr
	}
	return err
}

// dialBackend opens the backend connection of client connection c to u on
// the transport t, offering the ALPN that the client negotiated.
func (h *Handler) dialBackend(c *quic.Conn, u *Upstream, t *backendTransport) (*quic.Conn, error) {
	alpn := c.ConnectionState().TLS.NegotiatedProtocol
	tlsConf := u.quicTLS[alpn]
	if tlsConf == nil { // the client negotiated one of quic.alpn
		return nil, fmt.Errorf("ALPN %q: not in quic.alpn", alpn)
	}
	ctx, cancel := context.WithTimeout(c.Context(), h.QUIC.dialTimeout)
	defer cancel()
	conf := h.QUIC.backendConfig
	if !c.ConnectionState().SupportsDatagrams.Remote {
		conf = h.QUIC.backendConfigNoDatagrams // nothing of the backend's could be relayed
	}
	return t.tr.Dial(ctx, net.UDPAddrFromAddrPort(u.addr), tlsConf, conf)
}

// backendTLSFor is the TLS configs of the backend connections to u, by the
// ALPN they offer: each resumes the sessions of u's host (quic_sessions.go).
func (q *QUIC) backendTLSFor(u *Upstream) map[string]*tls.Config {
	base := q.backendTLS.Clone()
	if base.ServerName == "" {
		base.ServerName = u.serverName
	}
	base.ClientSessionCache = u.host.quicSessions.cache(base)
	confs := make(map[string]*tls.Config, len(q.ALPN))
	for _, p := range q.ALPN {
		c := base.Clone()
		c.NextProtos = []string{p}
		confs[p] = c
	}
	return confs
}

// Interface guards
var _ caddy.Destructor = (*backendTransport)(nil)
