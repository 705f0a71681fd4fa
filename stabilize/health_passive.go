package stabilize

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// PassiveHealthChecks judges upstreams by live traffic: an ICMP destination
// unreachable (port, host, network unreachable or prohibited) reported for a
// datagram sent to an upstream, or optionally a datagram left without a
// usable reply, is a failure; max_fails failures within fail_duration mark
// the upstream down for fail_duration, after which it is picked again.
// Failures while it is down are not counted. On Linux, ICMP errors are read
// from the per-flow sockets' error queues (IP_RECVERR), in per packet and
// per flow mode alike; elsewhere only reply_timeout detects failures.
//
// As in Caddy's reverse_proxy, failures count per upstream address: every
// handler with passive checks that dials the address counts its failures
// there, each with its own max_fails and fail_duration, and heeds the
// verdict. Handlers without passive checks ignore it.
type PassiveHealthChecks struct {
	// A datagram sent to an upstream that gets no reply from it within this
	// time counts as a failure. For request/response protocols only. Each
	// flow watches its oldest unanswered datagram; a failure is noticed
	// between 1 and 2 reply_timeouts after it is due. A reply longer than
	// the reply buffer (dropped as `reply_too_large`) fails the watched
	// datagram at once, with that reason. Behind QUIC termination, each
	// request to a udp/ upstream is watched, up to the quic block's
	// reply_timeout if that is shorter. At least 10ms. Default: 0 (off).
	ReplyTimeout caddy.Duration `json:"reply_timeout,omitempty"`

	// Failures within fail_duration that mark the upstream down. Default: 1.
	MaxFails int `json:"max_fails,omitempty"`

	// How long a failure is remembered, and how long an upstream stays down
	// once max_fails is reached. Default: 10s.
	FailDuration caddy.Duration `json:"fail_duration,omitempty"`
}

// reasonReplyTooLarge is the reason of a passive failure for a reply that
// could not be relayed, named after its drop reason.
const reasonReplyTooLarge = "reply larger than the reply buffer (reply_too_large)"

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
	if hh.down.Load() {
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
	hh.passiveGen++
	gen := hh.passiveGen
	time.AfterFunc(failDuration, func() { h.passiveExpired(logger, gen, failDuration) })
	flip(&hh.down, true, logger, h.addr, "passive",
		reason+" ("+plural(n, "failure")+" within "+failDuration.String()+")")
}

// passiveExpired ends the passive down period gen.
func (h *Host) passiveExpired(logger *zap.Logger, gen uint64, failDuration time.Duration) {
	hh := &h.health
	hh.mu.Lock()
	defer hh.mu.Unlock()
	if hh.passiveGen != gen {
		return
	}
	flip(&hh.down, false, logger, h.addr, "passive", "down for fail_duration "+failDuration.String())
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
// A reply too large to relay is no answer, but the upstream did answer: it
// stops the watch and counts a failure at once, naming the real reason.
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
// on the hot path: a few atomic operations, no allocation. It reports
// whether the reply answered the watched datagram.
func (fl *Flow) replyFrom(u *Upstream) bool {
	fh := &fl.health
	s := fh.since.Load()
	return s != 0 && fh.upstream.Load() == u && fh.since.CompareAndSwap(s, 0)
}

// replyTooLarge notes that u sent fl a reply too large to relay. With
// reply_timeout, a reply to the watched datagram fails it at once.
func (fl *Flow) replyTooLarge(u *Upstream) {
	if hc := fl.h.HealthChecks; hc != nil && hc.replyTimeout > 0 && fl.replyFrom(u) {
		fl.h.passiveFailure(u, reasonReplyTooLarge)
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

// prepareSocket sets up a new upstream-facing socket: buffer sizes
// (sizeSocket), and reporting of ICMP errors for passive health checks.
func (h *Handler) prepareSocket(conn udpio.Conn) error {
	if err := h.sizeSocket(conn); err != nil {
		return err
	}
	if hc := h.HealthChecks; hc != nil && hc.Passive != nil {
		if err := udpio.EnableICMPErrors(conn); err != nil {
			return fmt.Errorf("enabling ICMP error reports for passive health checks: %w", err)
		}
	}
	return nil
}

// sizeSocket sets an upstream-facing socket's buffer sizes, read_buffer
// and write_buffer. The kernel may cap them (net.core.rmem_max, wmem_max).
func (h *Handler) sizeSocket(conn udpio.Conn) error {
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
	return nil
}

// maxErrQueue bounds the entries read from the error queue per socket error,
// so that a flood of ICMP errors cannot hold up the replies; the rest is
// read at the next error, which the kernel reports while any are left.
const maxErrQueue = 16

// socketError handles an error reading fl's upstream socket, such as an ICMP
// port-unreachable from one of the upstreams. It runs on the flow's reply
// path, which reads on when it returns, and must not block. Any error makes
// it drain the socket's error queue; with passive checks it counts a
// failure for each upstream an ICMP error names.
func (h *Handler) socketError(fl *Flow, err error) {
	fh := &fl.health
	// The queue is drained even without passive checks: a reload may
	// have moved the flow here from a handler with them, and an unread
	// queue makes epoll report the socket for ever.
	var errs [maxErrQueue]udpio.ICMPError
	n, qerr := udpio.ReadErrQueue(fl.conn, errs[:])
	if hc := h.HealthChecks; hc != nil && hc.Passive != nil {
		for _, e := range errs[:n] {
			u, reason := h.byAddr[e.Dest], icmpReason(e.Origin, e.Type, e.Code)
			if u == nil || reason == "" {
				if ce := h.logger.Check(zap.DebugLevel, "ICMP error not counted"); ce != nil {
					ce.Write(zap.Stringer("client", fl.client), zap.Stringer("destination", e.Dest),
						zap.Stringer("offender", e.Offender))
				}
				continue
			}
			h.passiveFailure(u, reason)
		}
	}
	if n > 0 {
		return
	}
	if qerr != nil {
		err = fmt.Errorf("%w; reading the socket error queue: %w", err, qerr)
	}
	// An error the queue does not explain: log it once per flow.
	if !fh.errLogged {
		fh.errLogged = true
		h.logger.Debug("reading upstream replies", zap.Stringer("client", fl.client), zap.Error(err))
	}
}

// icmpReason names an ICMP error that counts as an upstream failure: a
// destination unreachable, except "fragmentation needed" (ICMPv4) and
// "packet too big" (ICMPv6), which are about the path MTU. It returns ""
// for errors that do not count, such as local ones.
func icmpReason(origin, typ, code uint8) string {
	switch origin {
	case udpio.OriginICMP:
		if typ != 3 { // destination unreachable
			return ""
		}
		switch code {
		case 0, 6, 11:
			return reasonNetUnreachable
		case 1, 7, 12:
			return reasonHostUnreachable
		case 2:
			return reasonProtoUnreach
		case 3:
			return reasonPortUnreachable
		case 4:
			return "" // fragmentation needed
		case 9, 10, 13:
			return reasonProhibited
		}
		return reasonUnreachable
	case udpio.OriginICMP6:
		if typ != 1 { // destination unreachable
			return ""
		}
		switch code {
		case 0:
			return reasonNetUnreachable
		case 1, 5, 6:
			return reasonProhibited
		case 3:
			return reasonHostUnreachable
		case 4:
			return reasonPortUnreachable
		}
		return reasonUnreachable
	}
	return ""
}
