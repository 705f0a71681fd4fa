package stabilize

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
)

// MaxWeight is the largest upstream weight.
const MaxWeight = 10000

// Upstream is one UDP server that datagrams are balanced to.
type Upstream struct {
	// The network address of the upstream: `udp/host:port`, `udp4/...`,
	// `udp6/...` or plain `host:port` (UDP). A host name is resolved once,
	// when the config is loaded.
	Dial string `json:"dial"`

	// The weight of this upstream for weighted policies, from 1 to 10000.
	// Default: 1.
	Weight int `json:"weight,omitempty"`

	addr netip.AddrPort
	host *Host

	// Health, set up by provisionHealthChecks; see Upstream.healthy.
	prober        *prober // the active checks' verdict, nil without them
	passiveChecks bool    // the handler heeds the host's passive verdict
}

// provision resolves the dial address and attaches the shared host state.
func (u *Upstream) provision() error {
	addr, err := parseUpstreamAddr(u.Dial)
	if err != nil {
		return err
	}
	if u.Weight < 0 || u.Weight > MaxWeight {
		return fmt.Errorf("upstream %q: weight %d: must be from 1 to %d", u.Dial, u.Weight, MaxWeight)
	}
	if u.Weight == 0 {
		u.Weight = 1
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

// parseUpstreamAddr parses a Caddy network address that must name one UDP
// host and port.
func parseUpstreamAddr(dial string) (netip.AddrPort, error) {
	na, err := checkUpstreamAddr(dial)
	if err != nil {
		return netip.AddrPort{}, err
	}
	ua, err := net.ResolveUDPAddr(na.Network, net.JoinHostPort(na.Host, strconv.FormatUint(uint64(na.StartPort), 10)))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("upstream %q: %w", dial, err)
	}
	ap := ua.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// checkUpstreamAddr parses a Caddy network address that must name one UDP
// host and port, without resolving it. A plain host:port is UDP.
func checkUpstreamAddr(dial string) (caddy.NetworkAddress, error) {
	na, err := caddy.ParseNetworkAddressWithDefaults(dial, "udp", 0)
	if err != nil {
		return na, fmt.Errorf("upstream %q: %w", dial, err)
	}
	switch na.Network {
	case "udp", "udp4", "udp6":
	default:
		return na, fmt.Errorf("upstream %q: network %q is not UDP (use udp/, udp4/ or udp6/)", dial, na.Network)
	}
	if na.PortRangeSize() != 1 {
		return na, fmt.Errorf("upstream %q: exactly one port is required", dial)
	}
	if na.StartPort == 0 {
		return na, fmt.Errorf("upstream %q: a port (1-65535) is required", dial)
	}
	if na.Host == "" {
		return na, fmt.Errorf("upstream %q: a host is required", dial)
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
}

// Flows is the number of live flows currently assigned to the host.
func (h *Host) Flows() int64 { return h.flows.Load() }

// hosts is the shared host state, keyed by dial address.
var hosts = caddy.NewUsagePool()
