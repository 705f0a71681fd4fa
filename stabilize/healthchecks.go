package stabilize

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Health checks
//
// An upstream is down when its active checks say so or when its passive
// checks say so; hostHealth.down is that combined verdict, read with one
// atomic load on the data path. Every flip of it bumps healthEpoch, so each
// handler rebuilds its pool of healthy upstreams (Handler.available) and a
// per-flow flow on a down upstream moves on its next datagram. Each flip is
// logged once, at Warn (down) or Info (up), with the upstream and the reason.
//
// The state lives in Host, which the `hosts` UsagePool shares by upstream
// address between all handlers and configs, so a reload keeps it: a down
// upstream stays down in the new config until the checks bring it up. The
// checks themselves belong to the handler: each handler with active checks
// probes its upstreams, so two handlers that dial the same address both probe
// it, each with its own settings, and both feed the same counters.

// HealthChecks configures how upstreams are judged healthy. Every policy
// picks only from healthy upstreams. Active and passive checks combine: an
// upstream is down while either says it is down.
type HealthChecks struct {
	// Active checks probe each upstream on a timer.
	Active *ActiveHealthChecks `json:"active,omitempty"`

	// Passive checks judge upstreams by live traffic. Configuring them (even
	// as an empty object) turns on the detection of ICMP errors from the
	// upstreams.
	Passive *PassiveHealthChecks `json:"passive,omitempty"`

	// When every upstream is down, drop datagrams (counted as `no_upstream`)
	// instead of the default, failing open: picking from all upstreams as if
	// they were healthy, counted as `all_down`.
	DropWhenAllDown bool `json:"drop_when_all_down,omitempty"`

	// Set up by provisionHealthChecks.
	logger       *zap.Logger
	probe        []byte         // the active probe datagram
	expect       *regexp.Regexp // compiled Active.Expect
	judged       bool           // the active checks expect a reply
	probeTimeout string         // "no reply within <timeout>"
	replyTimeout time.Duration  // Passive.ReplyTimeout, 0 when off
	noReply      string         // "no reply within <reply_timeout>"
	clock        atomic.Int64   // reply_timeout ticks, see sweepReplies
	checked      []*Host        // the hosts whose checkers count this handler
	cancel       context.CancelFunc
	wg           sync.WaitGroup
}

// ActiveHealthChecks sends a probe datagram to each upstream every interval
// and judges the reply. Each probe goes from a new connected UDP socket, so
// an ICMP port-unreachable fails the check at once.
type ActiveHealthChecks struct {
	// The probe datagram, as text. Default: empty datagram.
	Send string `json:"send,omitempty"`

	// The probe datagram, in hexadecimal. Use either send or send_hex.
	SendHex string `json:"send_hex,omitempty"`

	// A regular expression (Go syntax) the reply must match. With no expect,
	// expect_exact or expect_prefix, a check passes if no ICMP
	// port-unreachable arrives within the timeout (a reply also passes), as
	// in NGINX Plus. When several are given, all must hold. To expect an
	// empty reply, use expect `^$`.
	Expect string `json:"expect,omitempty"`

	// The exact reply expected.
	ExpectExact string `json:"expect_exact,omitempty"`

	// A prefix the reply must start with.
	ExpectPrefix string `json:"expect_prefix,omitempty"`

	// The port to send probes to, if not the upstream's own, on the
	// upstream's address.
	Port int `json:"port,omitempty"`

	// How often to probe each upstream, at least 10ms. Default: 5s.
	Interval caddy.Duration `json:"interval,omitempty"`

	// How long to wait for a reply, at most the interval. Default: 2s, or
	// the interval if that is shorter.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// Consecutive passing checks that mark a down upstream up. Default: 1.
	Passes int `json:"passes,omitempty"`

	// Consecutive failing checks that mark an up upstream down. Default: 1.
	Fails int `json:"fails,omitempty"`
}

// PassiveHealthChecks judges upstreams by live traffic: an ICMP destination
// unreachable (port, host, network unreachable or prohibited) reported for a
// datagram sent to an upstream, or optionally a datagram left without a
// reply, is a failure; max_fails failures within fail_duration mark the
// upstream down for fail_duration, after which it is picked again. Failures
// while it is down are not counted. On Linux, ICMP errors are read from the
// per-flow sockets' error queues (IP_RECVERR), in per packet and per flow
// mode alike; elsewhere only reply_timeout detects failures.
type PassiveHealthChecks struct {
	// A datagram sent to an upstream that gets no reply from it within this
	// time counts as a failure. For request/response protocols only. Each
	// flow watches its oldest unanswered datagram; a failure is noticed
	// between 1 and 2 reply_timeouts after it is due. At least 10ms.
	// Default: 0 (off).
	ReplyTimeout caddy.Duration `json:"reply_timeout,omitempty"`

	// Failures within fail_duration that mark the upstream down. Default: 1.
	MaxFails int `json:"max_fails,omitempty"`

	// How long a failure is remembered, and how long an upstream stays down
	// once max_fails is reached. Default: 10s.
	FailDuration caddy.Duration `json:"fail_duration,omitempty"`
}

// Defaults and limits.
const (
	defaultInterval     = 5 * time.Second
	defaultTimeout      = 2 * time.Second
	defaultFailDuration = 10 * time.Second
	minInterval         = 10 * time.Millisecond // of active checks and reply_timeout
)

// healthEpoch counts health transitions of all hosts; a handler rebuilds its
// pool of healthy upstreams when it changes.
var healthEpoch atomic.Uint64

// hostHealth is the health state of a host, shared by all handlers and
// configs that use its address.
type hostHealth struct {
	down atomic.Bool // the combined verdict; flips bump healthEpoch

	lastCheck atomic.Pointer[CheckResult]
	latency   latencyHistogram // of passing active checks

	mu         sync.Mutex  // guards the rest
	activeDown bool        // the active checks' verdict
	passes     int         // consecutive passing active checks
	fails      int         // consecutive failing active checks
	checkers   int         // handlers probing the host
	passive    bool        // the passive checks' verdict: down
	passiveGen uint64      // identifies the current passive down period
	failures   []time.Time // recent passive failures, oldest first
}

// Healthy reports whether the host may be picked. It is one atomic load.
func (h *Host) Healthy() bool { return !h.health.down.Load() }

// CheckResult is the outcome of one active health check.
type CheckResult struct {
	Time   time.Time `json:"time"`
	Passed bool      `json:"passed"`
	Reason string    `json:"reason,omitempty"` // why it failed
	// The round-trip time of the probe when a reply arrived, else 0.
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
// and starts the active checks and the reply_timeout sweeper.
func (h *Handler) provisionHealthChecks() error {
	hc := h.HealthChecks
	if hc == nil {
		return nil
	}
	hc.logger = h.logger
	if a := hc.Active; a != nil {
		if err := hc.provisionActive(a); err != nil {
			return fmt.Errorf("health_checks.active.%w", err)
		}
	}
	if p := hc.Passive; p != nil {
		if err := hc.provisionPassive(p); err != nil {
			return fmt.Errorf("health_checks.passive.%w", err)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	hc.cancel = cancel
	if hc.Active != nil {
		for _, u := range h.Upstreams {
			u.host.addChecker()
			hc.checked = append(hc.checked, u.host)
			hc.wg.Add(1)
			go h.activeChecks(ctx, u)
		}
	}
	if hc.replyTimeout > 0 {
		hc.clock.Store(1) // 0 means "not awaiting a reply"
		hc.wg.Add(1)
		go h.sweepReplies(ctx)
	}
	return nil
}

// provisionActive validates and completes the active checks. Its errors
// start with the field name, to follow "health_checks.active.".
func (hc *HealthChecks) provisionActive(a *ActiveHealthChecks) error {
	switch {
	case a.Send != "" && a.SendHex != "":
		return fmt.Errorf("send and send_hex: use one, not both (send %q, send_hex %q)", a.Send, a.SendHex)
	case a.SendHex != "":
		b, err := hex.DecodeString(a.SendHex)
		if err != nil {
			return fmt.Errorf("send_hex %q: invalid hex: %v", a.SendHex, err)
		}
		hc.probe = b
	default:
		hc.probe = []byte(a.Send)
	}
	if a.Expect != "" {
		re, err := regexp.Compile(a.Expect)
		if err != nil {
			return fmt.Errorf("expect %q: invalid regexp: %v", a.Expect, err)
		}
		hc.expect = re
	}
	hc.judged = a.Expect != "" || a.ExpectExact != "" || a.ExpectPrefix != ""
	if a.Port < 0 || a.Port > math.MaxUint16 {
		return fmt.Errorf("port %d: must be from 1 to 65535", a.Port)
	}
	switch {
	case a.Interval < 0:
		return fmt.Errorf("interval %v: must not be negative", time.Duration(a.Interval))
	case a.Interval == 0:
		a.Interval = caddy.Duration(defaultInterval)
	case time.Duration(a.Interval) < minInterval:
		return fmt.Errorf("interval %v: must be at least %v", time.Duration(a.Interval), minInterval)
	}
	switch {
	case a.Timeout < 0:
		return fmt.Errorf("timeout %v: must not be negative", time.Duration(a.Timeout))
	case a.Timeout == 0:
		a.Timeout = min(caddy.Duration(defaultTimeout), a.Interval)
	case a.Timeout > a.Interval:
		return fmt.Errorf("timeout %v: must not exceed the interval (%v)", time.Duration(a.Timeout), time.Duration(a.Interval))
	}
	hc.probeTimeout = "no reply within " + time.Duration(a.Timeout).String()
	if a.Passes < 0 {
		return fmt.Errorf("passes %d: must be a positive count", a.Passes)
	}
	if a.Passes == 0 {
		a.Passes = 1
	}
	if a.Fails < 0 {
		return fmt.Errorf("fails %d: must be a positive count", a.Fails)
	}
	if a.Fails == 0 {
		a.Fails = 1
	}
	return nil
}

// provisionPassive validates and completes the passive checks. Its errors
// start with the field name, to follow "health_checks.passive.".
func (hc *HealthChecks) provisionPassive(p *PassiveHealthChecks) error {
	switch {
	case p.ReplyTimeout < 0:
		return fmt.Errorf("reply_timeout %v: must not be negative", time.Duration(p.ReplyTimeout))
	case p.ReplyTimeout > 0 && time.Duration(p.ReplyTimeout) < minInterval:
		return fmt.Errorf("reply_timeout %v: must be at least %v", time.Duration(p.ReplyTimeout), minInterval)
	}
	hc.replyTimeout = time.Duration(p.ReplyTimeout)
	hc.noReply = "no reply within " + hc.replyTimeout.String()
	if p.MaxFails < 0 {
		return fmt.Errorf("max_fails %d: must be a positive count", p.MaxFails)
	}
	if p.MaxFails == 0 {
		p.MaxFails = 1
	}
	switch {
	case p.FailDuration < 0:
		return fmt.Errorf("fail_duration %v: must not be negative", time.Duration(p.FailDuration))
	case p.FailDuration == 0:
		p.FailDuration = caddy.Duration(defaultFailDuration)
	}
	return nil
}

// stopHealthChecks stops this handler's active checks and sweeper and waits
// for them. The hosts keep their health state for the next config; only an
// upstream that active checks marked down and that no handler checks any
// more is brought up, since nothing else would.
func (h *Handler) stopHealthChecks() {
	hc := h.HealthChecks
	if hc == nil || hc.cancel == nil {
		return
	}
	hc.cancel()
	hc.wg.Wait()
	hc.cancel = nil
	for _, host := range hc.checked {
		host.removeChecker(hc.logger)
	}
	hc.checked = nil
}

// Active checks

// activeChecks probes u every interval until ctx ends. Each upstream has its
// own goroutine, so a slow upstream does not delay the checks of others.
func (h *Handler) activeChecks(ctx context.Context, u *Upstream) {
	hc := h.HealthChecks
	defer hc.wg.Done()
	a := hc.Active
	target := u.addr
	if a.Port != 0 {
		target = netip.AddrPortFrom(u.addr.Addr(), uint16(a.Port))
	}
	buf := make([]byte, ListenerBufferSize)
	ticker := time.NewTicker(time.Duration(a.Interval))
	defer ticker.Stop()
	for {
		res, replied := hc.check(ctx, target, buf)
		if ctx.Err() != nil {
			return
		}
		u.host.activeResult(hc, res, replied)
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// check sends one probe to target and judges the outcome. replied says
// whether a reply arrived.
func (hc *HealthChecks) check(ctx context.Context, target netip.AddrPort, buf []byte) (res CheckResult, replied bool) {
	a := hc.Active
	network := "udp4"
	if target.Addr().Is6() {
		network = "udp6"
	}
	res.Time = time.Now()
	conn, err := net.DialUDP(network, nil, net.UDPAddrFromAddrPort(target))
	if err != nil {
		res.Reason = "opening a probe socket: " + err.Error()
		return res, false
	}
	defer conn.Close()
	// Stopping the checks closes the socket, which ends a pending read.
	defer context.AfterFunc(ctx, func() { _ = conn.Close() })()

	if err := conn.SetReadDeadline(res.Time.Add(time.Duration(a.Timeout))); err != nil {
		res.Reason = "setting the probe deadline: " + err.Error()
		return res, false
	}
	if _, err := conn.Write(hc.probe); err != nil {
		res.Reason = probeErrorReason("sending the probe", err)
		return res, false
	}
	n, err := conn.Read(buf)
	switch {
	case err == nil:
		res.Latency = time.Since(res.Time)
		if hc.matches(buf[:n]) {
			res.Passed = true
		} else {
			res.Reason = "reply did not match: " + quoteReply(buf[:n])
		}
		return res, true
	case os.IsTimeout(err):
		if hc.judged {
			res.Reason = hc.probeTimeout
		} else {
			res.Passed = true // no ICMP error in time: up, as in NGINX Plus
		}
	default:
		res.Reason = probeErrorReason("reading the reply", err)
	}
	return res, false
}

// matches reports whether reply meets every expectation configured.
func (hc *HealthChecks) matches(reply []byte) bool {
	a := hc.Active
	if a.ExpectExact != "" && string(reply) != a.ExpectExact {
		return false
	}
	if a.ExpectPrefix != "" && !bytes.HasPrefix(reply, []byte(a.ExpectPrefix)) {
		return false
	}
	if hc.expect != nil && !hc.expect.Match(reply) {
		return false
	}
	return true
}

// probeErrorReason describes a probe socket error, naming ICMP errors.
func probeErrorReason(what string, err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case syscall.ECONNREFUSED:
			return reasonPortUnreachable
		case syscall.EHOSTUNREACH:
			return reasonHostUnreachable
		case syscall.ENETUNREACH:
			return reasonNetUnreachable
		}
	}
	return what + ": " + err.Error()
}

// quoteReply quotes the start of a reply for a check result.
func quoteReply(b []byte) string {
	const limit = 64
	if len(b) > limit {
		return strconv.Quote(string(b[:limit])) + "…"
	}
	return strconv.Quote(string(b))
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

// addChecker counts a handler that probes the host.
func (h *Host) addChecker() {
	hh := &h.health
	hh.mu.Lock()
	hh.checkers++
	hh.mu.Unlock()
}

// removeChecker uncounts a handler that probed the host. When none is left,
// the active verdict is cleared: nothing could ever bring the host up again.
// During a reload the new config's handlers count before the old ones leave.
func (h *Host) removeChecker(logger *zap.Logger) {
	hh := &h.health
	hh.mu.Lock()
	defer hh.mu.Unlock()
	hh.checkers--
	if hh.checkers > 0 {
		return
	}
	hh.passes, hh.fails = 0, 0
	if hh.activeDown {
		hh.activeDown = false
		h.updateLocked(logger, "no active health checks any more")
	}
}

// activeResult records an active check of the host and applies passes and
// fails.
func (h *Host) activeResult(hc *HealthChecks, res CheckResult, replied bool) {
	hh := &h.health
	hh.lastCheck.Store(&res)
	if res.Passed && replied {
		hh.latency.observe(res.Latency)
	}
	a := hc.Active
	hh.mu.Lock()
	defer hh.mu.Unlock()
	if res.Passed {
		hh.fails = 0
		hh.passes++
		if hh.activeDown && hh.passes >= a.Passes {
			hh.activeDown = false
			h.updateLocked(hc.logger, plural(hh.passes, "passing health check")+" in a row")
		}
		return
	}
	hc.logger.Debug("health check failed", zap.Stringer("upstream", h.addr), zap.String("reason", res.Reason))
	hh.passes = 0
	hh.fails++
	if !hh.activeDown && hh.fails >= a.Fails {
		hh.activeDown = true
		h.updateLocked(hc.logger, res.Reason+" ("+plural(hh.fails, "failing health check")+" in a row)")
	}
}

// Passive checks

// passiveFailure counts a failure of u seen in live traffic. The caller
// checks that passive checks are configured.
func (h *Handler) passiveFailure(u *Upstream, reason string) {
	p := h.HealthChecks.Passive
	u.host.passiveFailure(h.logger, reason, p.MaxFails, time.Duration(p.FailDuration))
}

// passiveFailure counts a failure; maxFails of them within failDuration mark
// the host down for failDuration.
func (h *Host) passiveFailure(logger *zap.Logger, reason string, maxFails int, failDuration time.Duration) {
	hh := &h.health
	now := time.Now()
	hh.mu.Lock()
	defer hh.mu.Unlock()
	if hh.passive {
		return // down already; counting restarts when it comes back
	}
	old := 0
	for old < len(hh.failures) && now.Sub(hh.failures[old]) >= failDuration {
		old++
	}
	hh.failures = append(hh.failures[:0], hh.failures[old:]...)
	hh.failures = append(hh.failures, now)
	n := len(hh.failures)
	if n < maxFails {
		if ce := logger.Check(zap.DebugLevel, "upstream failure"); ce != nil {
			ce.Write(zap.Stringer("upstream", h.addr), zap.String("reason", reason),
				zap.Int("failures", n), zap.Int("max_fails", maxFails))
		}
		return
	}
	hh.failures = hh.failures[:0]
	hh.passive = true
	hh.passiveGen++
	gen := hh.passiveGen
	time.AfterFunc(failDuration, func() { h.passiveExpired(logger, gen, failDuration) })
	h.updateLocked(logger, reason+" ("+plural(n, "failure")+" within "+failDuration.String()+")")
}

// passiveExpired ends the passive down period gen.
func (h *Host) passiveExpired(logger *zap.Logger, gen uint64, failDuration time.Duration) {
	hh := &h.health
	hh.mu.Lock()
	defer hh.mu.Unlock()
	if !hh.passive || hh.passiveGen != gen {
		return
	}
	hh.passive = false
	h.updateLocked(logger, "down for fail_duration "+failDuration.String())
}

// updateLocked recomputes the combined verdict; a flip bumps healthEpoch and
// is logged once. hh.mu is held.
func (h *Host) updateLocked(logger *zap.Logger, reason string) {
	hh := &h.health
	down := hh.activeDown || hh.passive
	if hh.down.Load() == down {
		logger.Debug("upstream health unchanged", zap.Stringer("upstream", h.addr), zap.Bool("down", down),
			zap.String("reason", reason))
		return
	}
	hh.down.Store(down)
	healthEpoch.Add(1)
	if down {
		logger.Warn("upstream is down", zap.Stringer("upstream", h.addr), zap.String("reason", reason))
	} else {
		logger.Info("upstream is up", zap.Stringer("upstream", h.addr), zap.String("reason", reason))
	}
}

func plural(n int, what string) string {
	s := strconv.Itoa(n) + " " + what
	if n != 1 {
		s += "s"
	}
	return s
}

// reply_timeout
//
// Each flow watches one datagram at a time: the oldest sent since its last
// watched one was answered. sentTo starts watching when nothing is watched,
// a reply from the watched upstream stops it, and the handler's sweeper
// counts a failure for a datagram watched for reply_timeout. Time is the
// sweeper's tick count (the clock), one tick per reply_timeout/2 at least,
// so the data path reads no time. A datagram stamped with tick k was sent
// after tick k began, so by tick k+3 at least two half-timeouts, a whole
// reply_timeout, have passed.
//
// The races between the three goroutines can only lose a failure, never
// invent one: the sweeper clears a record with a compare-and-swap of its
// stamp, and a new record always has a later stamp than an expired one.

// flowHealth is the per-flow state of the health checks.
type flowHealth struct {
	since    atomic.Int64             // clock tick of the watched datagram; 0: none
	upstream atomic.Pointer[Upstream] // where it went; set before since

	errLogged bool // the flow has logged a socket error; reply path only
}

// sentTo notes that fl sent a datagram to u, for reply_timeout. It is on the
// hot path: a few atomic operations, no allocation.
func (fl *Flow) sentTo(u *Upstream) {
	hc := fl.h.HealthChecks
	if hc == nil || hc.replyTimeout == 0 {
		return
	}
	fh := &fl.health
	if fh.since.Load() != 0 {
		return
	}
	fh.upstream.Store(u)
	fh.since.Store(hc.clock.Load())
}

// replyFrom notes that fl received a reply from u, for reply_timeout. It is
// on the hot path: a few atomic operations, no allocation.
func (fl *Flow) replyFrom(u *Upstream) {
	fh := &fl.health
	if s := fh.since.Load(); s != 0 && fh.upstream.Load() == u {
		fh.since.CompareAndSwap(s, 0)
	}
}

// sweepReplies counts a failure for every watched datagram left without a
// reply for reply_timeout, until ctx ends.
func (h *Handler) sweepReplies(ctx context.Context) {
	hc := h.HealthChecks
	defer hc.wg.Done()
	// A timer reset after each sweep, unlike a ticker, never ticks early,
	// which the clock's arithmetic relies on.
	tick := hc.replyTimeout / 2
	timer := time.NewTimer(tick)
	defer timer.Stop()
	var expired []*Upstream
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		now := hc.clock.Add(1)
		h.mu.Lock()
		for fl := range h.flows {
			fh := &fl.health
			s := fh.since.Load()
			if s == 0 || now-s < 3 {
				continue
			}
			u := fh.upstream.Load()
			if fh.since.CompareAndSwap(s, 0) {
				expired = append(expired, u)
			}
		}
		h.mu.Unlock()
		for i, u := range expired {
			h.passiveFailure(u, hc.noReply)
			expired[i] = nil
		}
		expired = expired[:0]
		timer.Reset(tick)
	}
}

// Sockets

// prepareSocket sets up a new upstream-facing socket: buffer sizes, and
// reporting of ICMP errors for passive health checks. The kernel may cap
// the buffer sizes (net.core.rmem_max, wmem_max).
func (h *Handler) prepareSocket(conn *net.UDPConn) error {
	if h.ReadBuffer > 0 {
		if err := conn.SetReadBuffer(h.ReadBuffer); err != nil {
			return fmt.Errorf("setting read_buffer %d: %w", h.ReadBuffer, err)
		}
	}
	if h.WriteBuffer > 0 {
		if err := conn.SetWriteBuffer(h.WriteBuffer); err != nil {
			return fmt.Errorf("setting write_buffer %d: %w", h.WriteBuffer, err)
		}
	}
	if hc := h.HealthChecks; hc != nil && hc.Passive != nil {
		if err := enableICMPErrors(conn); err != nil {
			return fmt.Errorf("enabling ICMP error reports for passive health checks: %w", err)
		}
	}
	return nil
}

// icmpError is an ICMP error the kernel reported for a datagram sent from an
// upstream-facing socket.
type icmpError struct {
	dest     netip.AddrPort // where the datagram that drew it was sent
	offender netip.Addr     // who sent the ICMP error, if known
	reason   string         // for the log, "" if it is no upstream failure
}

// maxErrQueue bounds the entries read from the error queue per socket error,
// so that a flood of ICMP errors cannot hold up the replies; the rest is
// read at the next error, which the kernel reports while any are left.
const maxErrQueue = 16

// socketError handles an error reading fl's upstream socket, such as an ICMP
// port-unreachable from one of the upstreams. It runs on the flow's reply
// path, which reads on when it returns, and must not block. With passive checks,
// any error makes it drain the socket's error queue, counting a failure for
// each upstream an ICMP error names.
func (h *Handler) socketError(fl *Flow, err error) {
	fh := &fl.health
	if hc := h.HealthChecks; hc != nil && hc.Passive != nil {
		var errs [maxErrQueue]icmpError
		n, qerr := readErrQueue(fl.conn, errs[:])
		for _, e := range errs[:n] {
			u := h.byAddr[e.dest]
			if u == nil || e.reason == "" {
				if ce := h.logger.Check(zap.DebugLevel, "ICMP error not counted"); ce != nil {
					ce.Write(zap.Stringer("client", fl.client), zap.Stringer("destination", e.dest),
						zap.Stringer("offender", e.offender))
				}
				continue
			}
			h.passiveFailure(u, e.reason)
		}
		if n > 0 {
			return
		}
		if qerr != nil {
			err = fmt.Errorf("%w; reading the socket error queue: %w", err, qerr)
		}
	}
	// An error the queue does not explain: log it once per flow.
	if !fh.errLogged {
		fh.errLogged = true
		h.logger.Debug("reading upstream replies", zap.Stringer("client", fl.client), zap.Error(err))
	}
}
