package stabilize

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

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

// activeCheck is a validated ActiveHealthChecks with its defaults set,
// ready to probe.
type activeCheck struct {
	*ActiveHealthChecks
	probe   []byte         // the probe datagram
	expect  *regexp.Regexp // compiled Expect
	judged  bool           // a reply is expected
	noReply string         // "no reply within <timeout>"
	quic    *tls.Config    // quic/ upstreams: a QUIC handshake is the probe; see quic_health.go
}

// compileActive validates a, sets its defaults and compiles it. Its errors
// start with the field name, to follow "health_checks.active.".
func compileActive(a *ActiveHealthChecks) (*activeCheck, error) {
	c := &activeCheck{ActiveHealthChecks: a}
	switch {
	case a.Send != "" && a.SendHex != "":
		return nil, fmt.Errorf("send and send_hex: use one, not both (send %q, send_hex %q)", a.Send, a.SendHex)
	case a.SendHex != "":
		b, err := hex.DecodeString(a.SendHex)
		if err != nil {
			return nil, fmt.Errorf("send_hex %q: invalid hex: %v", a.SendHex, err)
		}
		c.probe = b
	default:
		c.probe = []byte(a.Send)
	}
	if a.Expect != "" {
		re, err := regexp.Compile(a.Expect)
		if err != nil {
			return nil, fmt.Errorf("expect %q: invalid regexp: %v", a.Expect, err)
		}
		c.expect = re
	}
	c.judged = a.Expect != "" || a.ExpectExact != "" || a.ExpectPrefix != ""
	if a.Port < 0 || a.Port > math.MaxUint16 {
		return nil, fmt.Errorf("port %d: must be from 1 to 65535", a.Port)
	}
	switch {
	case a.Interval < 0:
		return nil, fmt.Errorf("interval %v: must not be negative", time.Duration(a.Interval))
	case a.Interval == 0:
		a.Interval = caddy.Duration(defaultInterval)
	case time.Duration(a.Interval) < minInterval:
		return nil, fmt.Errorf("interval %v: must be at least %v", time.Duration(a.Interval), minInterval)
	}
	switch {
	case a.Timeout < 0:
		return nil, fmt.Errorf("timeout %v: must not be negative", time.Duration(a.Timeout))
	case a.Timeout == 0:
		a.Timeout = min(caddy.Duration(defaultTimeout), a.Interval)
	case a.Timeout > a.Interval:
		return nil, fmt.Errorf("timeout %v: must not exceed the interval (%v)", time.Duration(a.Timeout), time.Duration(a.Interval))
	}
	c.noReply = "no reply within " + time.Duration(a.Timeout).String()
	if a.Passes < 0 {
		return nil, fmt.Errorf("passes %d: must be a positive count", a.Passes)
	}
	if a.Passes == 0 {
		a.Passes = 1
	}
	if a.Fails < 0 {
		return nil, fmt.Errorf("fails %d: must be a positive count", a.Fails)
	}
	if a.Fails == 0 {
		a.Fails = 1
	}
	return c, nil
}

// String is the canonical form of the checks: every setting, defaults
// included, the probe in hex.
func (c *activeCheck) String() string {
	return fmt.Sprintf("send_hex=%x expect=%q expect_exact=%q expect_prefix=%q port=%d interval=%v timeout=%v passes=%d fails=%d",
		c.probe, c.Expect, c.ExpectExact, c.ExpectPrefix, c.Port, time.Duration(c.Interval), time.Duration(c.Timeout), c.Passes, c.Fails)
}

// key identifies the prober of upstream u under these checks: handlers
// whose checks give the same key share one prober and its verdict.
func (c *activeCheck) key(u *Upstream) string {
	return u.addr.String() + " " + c.String() + c.quicString(u.serverName)
}

// probers holds the running probers, keyed by activeCheck.key. A prober
// lives while any handler holds it, so a reload that keeps a handler's
// checks keeps their verdict: a down upstream stays down until the checks
// bring it up.
var probers = caddy.NewUsagePool()

// prober runs the active checks of one upstream address for every handler
// with identical checks, and holds their verdict.
type prober struct {
	check  *activeCheck
	host   *Host
	target netip.AddrPort             // where probes go
	name   string                     // quic/: the server name of the upstream
	logger atomic.Pointer[zap.Logger] // of the latest handler to join

	down      atomic.Bool // the verdict; flips bump healthEpoch
	lastCheck atomic.Pointer[CheckResult]

	mu     sync.Mutex // guards passes, fails and flips of down
	passes int        // consecutive passing checks
	fails  int        // consecutive failing checks

	cancel context.CancelFunc
	done   chan struct{}
}

// String is the canonical form of the prober's checks, with what decides
// a QUIC handshake's verdict (ALPN, server name, verification): as its key,
// without the address.
func (p *prober) String() string { return p.check.String() + p.check.quicString(p.name) }

// acquireProber returns the prober of u under check c, starting it if no
// handler runs it yet. The caller releases it with probers.Delete(key).
func acquireProber(key string, c *activeCheck, u *Upstream, logger *zap.Logger) (*prober, error) {
	v, _, err := probers.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newProber(c, u, logger), nil
	})
	if err != nil {
		return nil, err
	}
	p := v.(*prober)
	p.logger.Store(logger)
	return p, nil
}

// newProber starts probing u with check c.
func newProber(c *activeCheck, u *Upstream, logger *zap.Logger) *prober {
	p := &prober{check: c, host: u.host, target: u.addr, name: u.serverName, done: make(chan struct{})}
	p.logger.Store(logger)
	if c.Port != 0 {
		p.target = netip.AddrPortFrom(u.addr.Addr(), uint16(c.Port))
	}
	hh := &p.host.health
	hh.mu.Lock()
	hh.probers = append(hh.probers, p)
	hh.mu.Unlock()
	var ctx context.Context
	ctx, p.cancel = context.WithCancel(context.Background())
	go p.run(ctx)
	return p
}

// Destruct stops the prober once no handler holds it. Its down verdict no
// longer counts for the host.
func (p *prober) Destruct() error {
	p.cancel()
	<-p.done
	hh := &p.host.health
	hh.mu.Lock()
	hh.probers = slices.DeleteFunc(hh.probers, func(q *prober) bool { return q == p })
	hh.mu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down.Load() {
		hh.activeDown.Add(-1)
	}
	return nil
}

// run probes every interval until ctx ends. Each prober has its own
// goroutine, so a slow upstream does not delay the checks of others.
func (p *prober) run(ctx context.Context) {
	defer close(p.done)
	buf := make([]byte, ListenerBufferSize)
	ticker := time.NewTicker(time.Duration(p.check.Interval))
	defer ticker.Stop()
	for {
		var res CheckResult
		var replied bool
		if p.check.quic != nil {
			res, replied = p.check.probeQUIC(ctx, p.target, p.name)
		} else {
			res, replied = p.check.probeOnce(ctx, p.target, buf)
		}
		if ctx.Err() != nil {
			return
		}
		p.result(res, replied)
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// probeOnce sends one probe to target and judges the outcome. replied says
// whether a reply arrived.
func (c *activeCheck) probeOnce(ctx context.Context, target netip.AddrPort, buf []byte) (res CheckResult, replied bool) {
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

	if err := conn.SetReadDeadline(res.Time.Add(time.Duration(c.Timeout))); err != nil {
		res.Reason = "setting the probe deadline: " + err.Error()
		return res, false
	}
	if _, err := conn.Write(c.probe); err != nil {
		res.Reason = probeErrorReason("sending the probe", err)
		return res, false
	}
	n, err := conn.Read(buf)
	switch {
	case err == nil:
		res.Latency = time.Since(res.Time)
		if c.matches(buf[:n]) {
			res.Passed = true
		} else {
			res.Reason = "reply did not match: " + quoteReply(buf[:n])
		}
		return res, true
	case os.IsTimeout(err):
		if c.judged {
			res.Reason = c.noReply
		} else {
			res.Passed = true // no ICMP error in time: up, as in NGINX Plus
		}
	default:
		res.Reason = probeErrorReason("reading the reply", err)
	}
	return res, false
}

// matches reports whether reply meets every expectation configured.
func (c *activeCheck) matches(reply []byte) bool {
	if c.ExpectExact != "" && string(reply) != c.ExpectExact {
		return false
	}
	if c.ExpectPrefix != "" && !bytes.HasPrefix(reply, []byte(c.ExpectPrefix)) {
		return false
	}
	if c.expect != nil && !c.expect.Match(reply) {
		return false
	}
	return true
}

// result records a check and applies passes and fails to the verdict.
func (p *prober) result(res CheckResult, replied bool) {
	hh := &p.host.health
	if res.Passed && replied {
		hh.latency.observe(res.Latency) // first: whoever sees the check sees its latency
	}
	p.lastCheck.Store(&res)
	hh.lastCheck.Store(&res)
	logger := p.logger.Load()
	p.mu.Lock()
	defer p.mu.Unlock()
	if res.Passed {
		p.fails = 0
		p.passes++
		if p.down.Load() && p.passes >= p.check.Passes {
			hh.activeDown.Add(-1)
			flip(&p.down, false, logger, p.host.addr, "active",
				plural(p.passes, "passing health check")+" in a row")
		}
		return
	}
	logger.Debug("health check failed", zap.Stringer("upstream", p.host.addr), zap.String("reason", res.Reason))
	p.passes = 0
	p.fails++
	if !p.down.Load() && p.fails >= p.check.Fails {
		hh.activeDown.Add(1)
		flip(&p.down, true, logger, p.host.addr, "active",
			res.Reason+" ("+plural(p.fails, "failing health check")+" in a row)")
	}
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

// Interface guards
var (
	_ caddy.Destructor = (*prober)(nil)
	_ fmt.Stringer     = (*prober)(nil)
)
