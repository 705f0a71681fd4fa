package stabilize

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Health checks
//
// Two verdicts judge an upstream, as in Caddy's reverse_proxy:
//
//   - The active verdict belongs to a prober (health_active.go): one per
//     upstream address and active check config, in a UsagePool, so handlers
//     with identical checks share it, and a reload that keeps the checks
//     keeps it. A handler without active checks never sees another's.
//   - The passive verdict belongs to the Host (health_passive.go), shared by
//     every handler that dials the address: failures seen by any handler
//     with passive checks count, and only such handlers heed it.
//
// Each verdict is an atomic.Bool; Upstream.healthy, which the data path asks,
// loads at most two. Every flip of either bumps healthEpoch, so each handler
// rebuilds its pool of healthy upstreams (Handler.available) and a per-flow
// flow on a down upstream moves on its next datagram. Each flip is logged
// once, at Warn (down) or Info (up), with the upstream, the checks and the
// reason.

// HealthChecks configures how upstreams are judged healthy. Every policy
// picks only from healthy upstreams. Active and passive checks combine: an
// upstream is down while either says it is down. A handler heeds only the
// checks it configures.
type HealthChecks struct {
	// Active checks probe each upstream on a timer. Their verdict is this
	// handler's, shared only with handlers whose active checks are
	// identical.
	Active *ActiveHealthChecks `json:"active,omitempty"`

	// Passive checks judge upstreams by live traffic. Failures count per
	// upstream address, whichever handler sees them. Configuring passive
	// checks (even as an empty object) turns on the detection of ICMP errors
	// from the upstreams.
	Passive *PassiveHealthChecks `json:"passive,omitempty"`

	// When every upstream is down, drop datagrams (counted as `no_upstream`)
	// instead of the default, failing open: picking from all upstreams as if
	// they were healthy, counted as `all_down`.
	DropWhenAllDown bool `json:"drop_when_all_down,omitempty"`

	// Set up by provisionHealthChecks.
	active       *activeCheck  // compiled Active
	probers      []string      // the keys of the probers this handler holds
	replyTimeout time.Duration // Passive.ReplyTimeout, 0 when off
	noReply      string        // "no reply within <reply_timeout>"
	clock        atomic.Int64  // reply_timeout ticks, see sweepReplies
	cancel       context.CancelFunc
	wg           sync.WaitGroup
}

// Defaults and limits.
const (
	defaultInterval     = 5 * time.Second
	defaultTimeout      = 2 * time.Second
	defaultFailDuration = 10 * time.Second
	minInterval         = 10 * time.Millisecond // of active checks and reply_timeout
)

// healthEpoch counts the flips of every verdict; a handler rebuilds its pool
// of healthy upstreams when it changes.
var healthEpoch atomic.Uint64

// healthy reports whether the handler may pick u: neither its active checks
// nor, if it has passive checks, the host's passive verdict say down. It is
// on the data path: at most two atomic loads.
func (u *Upstream) healthy() bool {
	if u.prober != nil && u.prober.down.Load() {
		return false
	}
	return !u.passiveChecks || !u.host.health.down.Load()
}

// hostHealth is the health state of a host, shared by all handlers and
// configs that use its address.
type hostHealth struct {
	down       atomic.Bool  // the passive verdict; flips bump healthEpoch
	activeDown atomic.Int32 // probers of the host whose verdict is down

	lastCheck atomic.Pointer[CheckResult] // by any prober of the host
	latency   latencyHistogram            // of passing active checks

	mu         sync.Mutex  // guards the rest
	probers    []*prober   // of the host, for the admin API
	passiveGen uint64      // identifies the current passive down period
	failures   []time.Time // recent passive failures, oldest first
}

// Healthy reports whether no check holds the host down: neither its passive
// checks nor the active checks of any handler. A handler heeds only the
// checks it configures, so one may still pick a host reported down.
func (h *Host) Healthy() bool {
	return !h.health.down.Load() && h.health.activeDown.Load() == 0
}

// CheckResult is the outcome of one active health check.
type CheckResult struct {
	// When the check ended.
	Time time.Time `json:"time"`
	// Whether the reply matched.
	Passed bool `json:"passed"`
	// Why the check failed; empty when it passed.
	Reason string `json:"reason,omitempty"`
	// The round-trip time of the probe when a reply arrived, else 0.
	Latency time.Duration `json:"latency_ns"`
}

// LastCheck is the latest active check of the host by any handler, or nil.
func (h *Host) LastCheck() *CheckResult { return h.health.lastCheck.Load() }

// ActiveCheckStatus is the state of one set of active checks of a host,
// shared by the handlers whose checks are identical.
type ActiveCheckStatus struct {
	// The checks, in canonical form, defaults included.
	Checks string `json:"checks"`

	// The checks' verdict: whether those handlers may pick the host.
	Healthy bool `json:"healthy"`

	// The latest check, or null before the first.
	LastCheck *CheckResult `json:"last_check"`
}

// ActiveChecks is the state of every set of active checks of the host,
// sorted by Checks, or nil without active checks.
func (h *Host) ActiveChecks() []ActiveCheckStatus {
	hh := &h.health
	var out []ActiveCheckStatus
	hh.mu.Lock()
	for _, p := range hh.probers {
		out = append(out, ActiveCheckStatus{Checks: p.String(), Healthy: !p.down.Load(), LastCheck: p.lastCheck.Load()})
	}
	hh.mu.Unlock()
	slices.SortFunc(out, func(a, b ActiveCheckStatus) int { return strings.Compare(a.Checks, b.Checks) })
	return out
}

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

// provisionHealthChecks validates the health check config, sets defaults,
// and starts or joins the probers of the active checks and the
// reply_timeout sweeper.
func (h *Handler) provisionHealthChecks() error {
	hc := h.HealthChecks
	if hc == nil {
		return nil
	}
	if a := hc.Active; a != nil {
		c, err := compileActive(a)
		if err != nil {
			return fmt.Errorf("health_checks.active.%w", err)
		}
		if h.QUIC != nil && !h.QUIC.udp {
			c.quic = h.QUIC.probeTLS() // quic_health.go
		}
		hc.active = c
	}
	if p := hc.Passive; p != nil {
		if err := hc.provisionPassive(p); err != nil {
			return fmt.Errorf("health_checks.passive.%w", err)
		}
	}

	for _, u := range h.Upstreams {
		u.passiveChecks = hc.Passive != nil
		if hc.active != nil {
			key := hc.active.key(u)
			p, err := acquireProber(key, hc.active, u, h.logger)
			if err != nil {
				return fmt.Errorf("health_checks.active: upstream %q: %w", u.Dial, err)
			}
			hc.probers = append(hc.probers, key)
			u.prober = p
		}
	}
	if hc.replyTimeout > 0 {
		ctx, cancel := context.WithCancel(context.Background())
		hc.cancel = cancel
		hc.clock.Store(1) // 0 means "not awaiting a reply"
		hc.wg.Add(1)
		go h.sweepReplies(ctx)
	}
	return nil
}

// stopHealthChecks stops this handler's sweeper and releases its probers. A
// prober that another handler (of the next config, during a reload) holds
// goes on with its verdict; the last holder stops it.
func (h *Handler) stopHealthChecks() {
	hc := h.HealthChecks
	if hc == nil {
		return
	}
	if hc.cancel != nil {
		hc.cancel()
		hc.wg.Wait()
		hc.cancel = nil
	}
	for _, key := range hc.probers {
		if _, err := probers.Delete(key); err != nil {
			h.logger.Error("stopping active health checks", zap.String("checks", key), zap.Error(err))
		}
	}
	hc.probers = nil
}

// flip sets a verdict, bumping healthEpoch and logging when it changes. The
// caller serialises the flips of v.
func flip(v *atomic.Bool, down bool, logger *zap.Logger, addr netip.AddrPort, checks, reason string) {
	if v.Load() == down {
		return
	}
	v.Store(down)
	healthEpoch.Add(1)
	if down {
		logger.Warn("upstream is down", zap.Stringer("upstream", addr), zap.String("checks", checks),
			zap.String("reason", reason))
	} else {
		logger.Info("upstream is up", zap.Stringer("upstream", addr), zap.String("checks", checks),
			zap.String("reason", reason))
	}
}

// Reasons of ICMP errors, for active and passive checks.
const (
	reasonPortUnreachable = "ICMP port unreachable"
	reasonHostUnreachable = "ICMP host unreachable"
	reasonNetUnreachable  = "ICMP network unreachable"
	reasonProtoUnreach    = "ICMP protocol unreachable"
	reasonProhibited      = "ICMP administratively prohibited"
	reasonUnreachable     = "ICMP destination unreachable"
)

func plural(n int, what string) string {
	s := strconv.Itoa(n) + " " + what
	if n != 1 {
		s += "s"
	}
	return s
}
