package stabilize

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminUpstreams{})
}

// adminUpstreams is the admin API module that serves
// `GET /stabilize/upstreams`: the live state of every upstream in the
// shared host pool, that is every upstream address a stabilize handler of the
// running config dials (during a reload, also the old config's until it has
// stopped), read from the live counters without a config reload.
//
// The response is a JSON array sorted by address (numerically: IP, then
// port), one object per upstream address however many handlers dial it:
//
//	[
//	  {
//	    "address": "127.0.0.1:5301",
//	    "healthy": true,
//	    "active_flows": 1,
//	    "datagrams_to_upstream": 10,
//	    "bytes_to_upstream": 640,
//	    "datagrams_from_upstream": 10,
//	    "bytes_from_upstream": 660,
//	    "last_check": {"time": "…", "passed": true, "latency_ns": 81234},
//	    "active_checks": [
//	      {"checks": "send_hex=… interval=5s …", "healthy": true, "last_check": {…}}
//	    ]
//	  }
//	]
//
// The counters are cumulative across config reloads, like the
// caddy_stabilize_upstream_* metrics. Health is per handler: healthy says
// whether no check holds the address down, neither its passive checks
// (shared by address) nor any handler's active checks; active_checks has
// the verdict of each distinct set of active checks (handlers with
// identical checks share one). last_check is the latest active check by any
// of them, or null without active checks.
type adminUpstreams struct{}

// upstreamStatus is the state of one upstream in /stabilize/upstreams.
type upstreamStatus struct {
	// The resolved address of the upstream, host:port.
	Address string `json:"address"`

	// Whether no health check holds the upstream down: neither its passive
	// checks nor any handler's active checks. A handler heeds only the
	// checks it configures, so one may still pick an upstream reported down.
	Healthy bool `json:"healthy"`

	// Client flows currently assigned to the upstream, across all handlers.
	ActiveFlows int64 `json:"active_flows"`

	// Datagrams and bytes sent to the upstream.
	DatagramsToUpstream uint64 `json:"datagrams_to_upstream"`
	BytesToUpstream     uint64 `json:"bytes_to_upstream"`

	// Datagrams and bytes received from the upstream (replies).
	DatagramsFromUpstream uint64 `json:"datagrams_from_upstream"`
	BytesFromUpstream     uint64 `json:"bytes_from_upstream"`

	// QUIC termination: client connections relayed to the upstream now,
	// and streams relayed so far; each left out while zero.
	QUICConnections int64  `json:"quic_connections,omitempty"`
	QUICStreams     uint64 `json:"quic_streams,omitempty"`

	// The latest active health check by any handler, or null.
	LastCheck *CheckResult `json:"last_check"`

	// The verdict of each distinct set of active checks of the upstream.
	ActiveChecks []ActiveCheckStatus `json:"active_checks,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (adminUpstreams) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.stabilize",
		New: func() caddy.Module { return new(adminUpstreams) },
	}
}

// Routes returns the route of the /stabilize/upstreams endpoint.
func (a adminUpstreams) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{
		Pattern: "/stabilize/upstreams",
		Handler: caddy.AdminHandlerFunc(a.handleUpstreams),
	}}
}

// handleUpstreams reports the state of every upstream in the shared host
// pool.
func (adminUpstreams) handleUpstreams(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{
			HTTPStatus: http.StatusMethodNotAllowed,
			Err:        fmt.Errorf("method not allowed"),
		}
	}

	var all []*Host
	hosts.Range(func(_, val any) bool {
		if h, ok := val.(*Host); ok {
			all = append(all, h)
		}
		return true
	})
	slices.SortFunc(all, func(a, b *Host) int { return a.addr.Compare(b.addr) })

	results := make([]upstreamStatus, 0, len(all))
	for _, h := range all {
		results = append(results, upstreamStatus{
			Address:               h.addr.String(),
			Healthy:               h.Healthy(),
			ActiveFlows:           h.Flows(),
			DatagramsToUpstream:   h.datagramsSent.Load(),
			BytesToUpstream:       h.bytesSent.Load(),
			DatagramsFromUpstream: h.datagramsReceived.Load(),
			BytesFromUpstream:     h.bytesReceived.Load(),
			QUICConnections:       h.quic.conns.Load(),
			QUICStreams:           h.quic.streams.Load(),
			LastCheck:             h.LastCheck(),
			ActiveChecks:          h.ActiveChecks(),
		})
	}

	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(results); err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	return nil
}

// Interface guards
var _ caddy.AdminRouter = adminUpstreams{}
