package stabilize

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
)

// MaxWeight is the largest upstream weight.
const MaxWeight = 10000

// Upstream is one UDP server that datagrams are balanced to.
type Upstream struct {
	// The network address of the upstream: `udp/host:port`, `udp4/...`,
	// `udp6/...` or plain `host:port` (UDP); with the quic block, also
	// `quic/host:port`, a QUIC server that each client connection is relayed
	// to. A host name is resolved once, when the config is loaded.
	Dial string `json:"dial"`

	// The weight of this upstream for weighted policies, from 1 to 10000.
	// Default: 1.
	Weight int `json:"weight,omitempty"`

	// The upstream's QUIC-LB server ID in hexadecimal, as long as the
	// handler's quic_lb server_id_length (`per connection` only).
	ServerID string `json:"server_id,omitempty"`

	addr       netip.AddrPort
	host       *Host
	quic       bool                   // a quic/ upstream
	serverName string                 // quic/: the host of Dial, for TLS
	quicTLS    map[string]*tls.Config // quic/: backend TLS configs by ALPN; see backendTLSFor

	// Health, set up by provisionHealthChecks; see Upstream.healthy.
	prober        *prober // the active checks' verdict, nil without them
	passiveChecks bool    // the handler heeds the host's passive verdict
}

// provision resolves the dial address and attaches the shared host state.
func (u *Upstream) provision() error {
	dial := u.Dial
	if rest, ok := strings.CutPrefix(dial, "quic/"); ok {
		u.quic, dial = true, "udp/"+rest
		host, _, _ := net.SplitHostPort(rest)
		u.serverName = host
	}
	addr, err := parseUpstreamAddr(dial)
	if err != nil {
		return fmt.Errorf("upstream %q: %w", u.Dial, errors.Unwrap(err))
	}
	if u.Weight < 0 || u.Weight > MaxWeight {
		return fmt.Errorf("upstream %q: weight %d: must be from 1 to %d", u.Dial, u.Weight, MaxWeight)
	}
	if u.Weight == 0 {
		u.Weight = 1
	}
	if addr.Addr().Zone() != "" {
		return fmt.Errorf("upstream %q: an IPv6 zone (%s): link-local upstreams are not supported", u.Dial, addr.Addr().Zone())
	}
	u.addr = addr
	host, _ := hosts.LoadOrStore(addr.String(), &Host{addr: addr})
	u.host = host.(*Host)
	return nil
}

// release drops this config's reference to the shared host state.
func (u *Upstream) release() {
	if u.host != nil {
		_, _ = hosts.Delete(u.addr.String())
	}
}

// Addr is the resolved address of the upstream.
func (u *Upstream) Addr() netip.AddrPort { return u.addr }

// parseUpstreamAddr parses an upstream address, which must name one UDP
// host and port, and resolves it.
func parseUpstreamAddr(dial string) (netip.AddrPort, error) {
	na, err := parseUDPAddr(dial)
	if err == nil && na.Host == "" {
		err = errors.New("a host is required")
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("upstream %q: %w", dial, err)
	}
	ua, err := net.ResolveUDPAddr(na.Network, na.JoinHostPort(0))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("upstream %q: %w", dial, err)
	}
	return addrPort(ua), nil
}

// udpDial returns addr with the udp/ network if it names no network: a
// plain host:port is UDP.
func udpDial(addr string) string {
	if strings.Contains(addr, "/") {
		return addr
	}
	return "udp/" + addr
}

// parseUDPAddr parses a Caddy network address with one port on a UDP
// network: udp (the default), udp4 or udp6. It resolves nothing.
func parseUDPAddr(addr string) (caddy.NetworkAddress, error) {
	na, err := caddy.ParseNetworkAddressWithDefaults(addr, "udp", 0)
	switch {
	case err != nil:
		return na, err
	case na.Network != "udp" && na.Network != "udp4" && na.Network != "udp6":
		return na, fmt.Errorf("network %q is not UDP (use udp/, udp4/ or udp6/)", na.Network)
	case na.PortRangeSize() != 1:
		return na, errors.New("exactly one port is required")
	case na.StartPort == 0:
		return na, errors.New("a port (1-65535) is required")
	}
	return na, nil
}

// Host is the state of an upstream shared by every handler and config that
// dials the same address. It outlives config reloads in a UsagePool. Its
// fields are accessed atomically.
type Host struct {
	addr netip.AddrPort

	flows atomic.Int64 // live flows assigned to this host

	datagramsSent, bytesSent         atomic.Uint64 // towards the upstream
	datagramsReceived, bytesReceived atomic.Uint64 // from the upstream

	health hostHealth // see health.go

	quic         quicHostStats   // see quic_relay.go
	quicSessions backendSessions // see quic_sessions.go
}

// Flows is the number of live flows currently assigned to the host.
func (h *Host) Flows() int64 { return h.flows.Load() }

// hosts is the shared host state, keyed by dial address.
var hosts = caddy.NewUsagePool()
