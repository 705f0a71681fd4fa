package stabilize

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/logging" // the file log writer
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// captureHandlers records the handlers provisioned from now on, in order.
// Call it before startBalancer, so that it is reset after Caddy stops.
func captureHandlers(t *testing.T) func() []*Handler {
	t.Helper()
	var mu sync.Mutex
	var hs []*Handler
	handlerProvisioned = func(h *Handler) {
		mu.Lock()
		hs = append(hs, h)
		mu.Unlock()
	}
	t.Cleanup(func() { handlerProvisioned = nil })
	return func() []*Handler {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(hs)
	}
}

// onlyHandler is the one handler captured, or the test fails.
func onlyHandler(t *testing.T, handlers func() []*Handler) *Handler {
	t.Helper()
	hs := handlers()
	if len(hs) != 1 {
		t.Fatalf("%d handlers provisioned, want 1", len(hs))
	}
	return hs[0]
}

// withHealth is handlerConfig with health_checks.
func withHealth(per string, hc map[string]any, ups ...*testUpstream) map[string]any {
	h := handlerConfig(per, "", ups...)
	h["health_checks"] = hc
	return h
}

// dataGot is how many datagrams other than the probe u received.
func dataGot(u *testUpstream, probe string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for p, c := range u.payloads {
		if p != probe {
			n += *c
		}
	}
	return n
}

// waitFor polls cond like eventually and returns how long it took.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	eventually(t, timeout, what, cond)
	return time.Since(start)
}

// healthNetworks are the listener networks every health behaviour test runs
// on.
var healthNetworks = []string{"udp", FastNetwork}

// onHealthNetworks runs test as a subtest on each of healthNetworks.
func onHealthNetworks(t *testing.T, test func(t *testing.T, network string)) {
	for _, network := range healthNetworks {
		t.Run(network, func(t *testing.T) { test(t, network) })
	}
}

func needLinux(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("ICMP errors on unconnected sockets are reported on Linux only")
	}
}

// An upstream that stops answering the probe is marked down within
// fails×interval plus an interval, gets no traffic while down, and comes
// back after `passes` good checks.
func TestActiveHealthChecksExpect(t *testing.T) {
	onHealthNetworks(t, testActiveHealthChecksExpect)
}

func testActiveHealthChecksExpect(t *testing.T, network string) {
	const interval, fails, passes = 200 * time.Millisecond, 2, 2
	const slack = 250 * time.Millisecond
	a, b := startUpstream(t, "a"), startUpstream(t, "b")
	handlers := captureHandlers(t)
	lb := startBalancerOn(t, network, false, 30*time.Second, withHealth("packet", map[string]any{
		"active": map[string]any{
			"send": "PING", "expect": `\|PING$`, // the test upstream replies "<name>|PING"
			"interval": interval.String(), "timeout": "100ms", "passes": passes, "fails": fails,
		},
	}, a, b))
	h := onlyHandler(t, handlers)
	ua, ub := h.Upstreams[0], h.Upstreams[1]
	ha, hb := ua.host, ub.host

	eventually(t, 2*time.Second, "the first checks", func() bool {
		return ha.LastCheck() != nil && hb.LastCheck() != nil
	})
	for _, host := range []*Host{ha, hb} {
		if c := host.LastCheck(); !c.Passed || c.Latency <= 0 || c.Reason != "" {
			t.Fatalf("check of %s: %+v, want passed with a latency", host.addr, c)
		}
		if n, _, _ := host.health.latency.snapshot(); n == 0 {
			t.Errorf("no latency observed for %s", host.addr)
		}
	}
	cl := newClient(t, lb.addr)
	var names []string
	for i := range 4 {
		names = append(names, cl.mustRoundTrip(fmt.Sprintf("before-%d", i)))
	}
	if got := counts(names); got != "map[a:2 b:2]" {
		t.Fatalf("both healthy: %s", got)
	}

	a.silent.Store(true)
	took := waitFor(t, 3*time.Second, "a marked down", func() bool { return !ua.healthy() })
	if limit := fails*interval + interval + slack; took > limit {
		t.Errorf("a marked down after %v, want within %v", took, limit)
	}
	if c := ha.LastCheck(); c.Passed || c.Reason != "no reply within 100ms" {
		t.Errorf("last check of a: %+v, want failed with no reply within 100ms", c)
	}
	if !ub.healthy() {
		t.Fatal("b is down too")
	}
	if ha.Healthy() {
		t.Error("the host of a is reported healthy while its checks hold it down")
	}

	dataBefore, probesBefore := dataGot(a, "PING"), a.gotPayload("PING")
	for i := range 20 {
		if name := cl.mustRoundTrip(fmt.Sprintf("while-down-%d", i)); name != "b" {
			t.Fatalf("datagram %d went to %s while a is down", i, name)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := dataGot(a, "PING"); got != dataBefore {
		t.Errorf("a received %d datagrams of traffic while down", got-dataBefore)
	}
	if a.gotPayload("PING") == probesBefore {
		t.Error("a received no probes while down")
	}

	a.silent.Store(false)
	took = waitFor(t, 3*time.Second, "a back up", ua.healthy)
	if limit := passes*interval + interval + slack; took > limit {
		t.Errorf("a back up after %v, want within %v", took, limit)
	}
	names = names[:0]
	for i := range 4 {
		names = append(names, cl.mustRoundTrip(fmt.Sprintf("after-%d", i)))
	}
	if got := counts(names); got != "map[a:2 b:2]" {
		t.Fatalf("a back up: %s", got)
	}
}

// With no expected reply, silence passes and an ICMP port-unreachable
// fails; a server on the port again brings the upstream back.
func TestActiveHealthChecksNoExpect(t *testing.T) {
	onHealthNetworks(t, testActiveHealthChecksNoExpect)
}

func testActiveHealthChecksNoExpect(t *testing.T, network string) {
	const interval = 200 * time.Millisecond
	const slack = 250 * time.Millisecond
	a, b := startUpstream(t, "a"), startUpstream(t, "b")
	handlers := captureHandlers(t)
	lb := startBalancerOn(t, network, false, 30*time.Second, withHealth("packet", map[string]any{
		"active": map[string]any{"interval": interval.String()},
	}, a, b))
	h := onlyHandler(t, handlers)
	ua, ub := h.Upstreams[0], h.Upstreams[1]
	ha, hb := ua.host, ub.host
	if got := time.Duration(h.HealthChecks.Active.Timeout); got != interval {
		t.Errorf("timeout defaulted to %v, want the interval %v", got, interval)
	}

	// A silent upstream passes: no ICMP error within the timeout.
	b.silent.Store(true)
	silentSince := time.Now()
	eventually(t, 2*time.Second, "a check of b with no reply", func() bool {
		c := hb.LastCheck()
		return c != nil && c.Time.After(silentSince) && c.Latency == 0
	})
	if c := hb.LastCheck(); !c.Passed || !ub.healthy() {
		t.Fatalf("silent b: %+v, healthy %v; want passed", c, ub.healthy())
	}
	b.silent.Store(false)

	a.close()
	took := waitFor(t, 3*time.Second, "closed a marked down", func() bool { return !ua.healthy() })
	if limit := interval + interval + slack; took > limit {
		t.Errorf("a marked down after %v, want within %v", took, limit)
	}
	if c := ha.LastCheck(); c.Passed || c.Reason != reasonPortUnreachable {
		t.Errorf("last check of a: %+v, want failed with %q", c, reasonPortUnreachable)
	}
	cl := newClient(t, lb.addr)
	for i := range 6 {
		if name := cl.mustRoundTrip(fmt.Sprintf("down-%d", i)); name != "b" {
			t.Fatalf("datagram %d went to %s", i, name)
		}
	}

	a2 := startUpstreamAt(t, "a2", a.addr.String())
	took = waitFor(t, 3*time.Second, "a back up", ua.healthy)
	if limit := interval + interval + slack; took > limit {
		t.Errorf("a back up after %v, want within %v", took, limit)
	}
	var names []string
	for i := range 4 {
		names = append(names, cl.mustRoundTrip(fmt.Sprintf("up-%d", i)))
	}
	if got := counts(names); got != "map[a2:2 b:2]" {
		t.Fatalf("a back up: %s", got)
	}
	if a2.gotPayload("") == 0 {
		t.Error("a2 got no (empty) probe")
	}
}

// Passive checks find a closed port from live traffic (ICMP
// port-unreachable on the unconnected flow sockets), in both modes; the
// upstream then gets nothing until fail_duration has passed.
func TestPassiveHealthChecksICMP(t *testing.T) {
	needLinux(t)
	const failDuration = 2 * time.Second
	for _, tc := range []struct {
		network, per string
		maxFails     int
	}{{"udp", "packet", 2}, {"udp", "flow", 3}, {FastNetwork, "packet", 2}, {FastNetwork, "flow", 3}} {
		t.Run(tc.network+"/"+tc.per, func(t *testing.T) {
			a, b, dead := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "dead")
			handlers := captureHandlers(t)
			lb := startBalancerOn(t, tc.network, false, 30*time.Second, withHealth(tc.per, map[string]any{
				"passive": map[string]any{"max_fails": tc.maxFails, "fail_duration": failDuration.String()},
			}, a, b, dead))
			h := onlyHandler(t, handlers)
			ud := h.Upstreams[2]
			hd := ud.host
			dead.close()

			// In per packet mode one client's datagrams rotate over the three
			// upstreams; in per flow mode every client is a new flow.
			cl := newClient(t, lb.addr)
			send := func(i int) {
				c := cl
				if tc.per == "flow" {
					c = newClient(t, lb.addr)
				}
				if _, err := c.conn.Write([]byte(fmt.Sprintf("live-%d", i))); err != nil {
					t.Fatal(err)
				}
			}
			for i := 0; ud.healthy(); i++ {
				if i == 300 {
					t.Fatalf("dead upstream still up after %d datagrams to it", hd.datagramsSent.Load())
				}
				send(i)
				time.Sleep(5 * time.Millisecond)
			}
			downAt := time.Now()
			sent := hd.datagramsSent.Load()
			if sent < uint64(tc.maxFails) {
				t.Fatalf("down after %d datagrams to it, want max_fails %d", sent, tc.maxFails)
			}

			for i := range 12 {
				c := cl
				if tc.per == "flow" {
					c = newClient(t, lb.addr)
				}
				if name := c.mustRoundTrip(fmt.Sprintf("down-%d", i)); name != "a" && name != "b" {
					t.Fatalf("reply from %s", name)
				}
			}
			if got := hd.datagramsSent.Load(); got != sent {
				t.Errorf("%d datagrams sent to the upstream while down", got-sent)
			}

			eventually(t, failDuration+time.Second, "the upstream back after fail_duration", ud.healthy)
			if took := time.Since(downAt); took < failDuration-200*time.Millisecond {
				t.Errorf("up again after %v, want fail_duration %v", took, failDuration)
			}
			for i := 0; hd.datagramsSent.Load() == sent; i++ {
				if i == 30 {
					t.Fatal("no traffic to the upstream after it came back")
				}
				send(1000 + i)
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
}

// reply_timeout marks a silent upstream down from live traffic, never
// sooner than the timeout, and never the upstream that replies.
func TestPassiveHealthChecksReplyTimeout(t *testing.T) {
	onHealthNetworks(t, testPassiveHealthChecksReplyTimeout)
}

func testPassiveHealthChecksReplyTimeout(t *testing.T, network string) {
	const replyTimeout = 200 * time.Millisecond
	a, b := startUpstream(t, "a"), startUpstream(t, "b")
	b.silent.Store(true)
	handlers := captureHandlers(t)
	lb := startBalancerOn(t, network, false, 30*time.Second, withHealth("flow", map[string]any{
		"passive": map[string]any{"reply_timeout": replyTimeout.String(), "max_fails": 3, "fail_duration": "10s"},
	}, a, b))
	h := onlyHandler(t, handlers)
	ua, ub := h.Upstreams[0], h.Upstreams[1]
	ha := ua.host

	// Six flows, alternately on a and b.
	var clients []*client
	for i := range 6 {
		cl := newClient(t, lb.addr)
		clients = append(clients, cl)
		if _, err := cl.conn.Write([]byte(fmt.Sprintf("req-%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	took := waitFor(t, 3*time.Second, "b marked down", func() bool { return !ub.healthy() })
	if elapsed := time.Since(start); elapsed < replyTimeout {
		t.Errorf("b marked down after %v, before reply_timeout %v", elapsed, replyTimeout)
	}
	if limit := 2*replyTimeout + 300*time.Millisecond; took > limit {
		t.Errorf("b marked down after %v, want within %v", took, limit)
	}
	if !ua.healthy() {
		t.Fatal("a, which replies, is down too")
	}
	ha.health.mu.Lock()
	falseFailures := len(ha.health.failures)
	ha.health.mu.Unlock()
	if falseFailures != 0 {
		t.Errorf("a, which replies, has %d failures", falseFailures)
	}
	// The flows on b move to a without the clients changing anything.
	for i, cl := range clients {
		if name := cl.mustRoundTrip(fmt.Sprintf("again-%d", i)); name != "a" {
			t.Fatalf("flow %d answered by %s", i, name)
		}
	}
	if n := ha.Flows(); n != 6 {
		t.Errorf("a has %d flows, want all 6", n)
	}
}

// A per-flow flow whose upstream goes down continues on another one: the
// same client socket gets replies, now from the other upstream.
func TestFlowMovesWhenUpstreamGoesDown(t *testing.T) {
	needLinux(t)
	onHealthNetworks(t, testFlowMovesWhenUpstreamGoesDown)
}

func testFlowMovesWhenUpstreamGoesDown(t *testing.T, network string) {
	a, b := startUpstream(t, "a"), startUpstream(t, "b")
	handlers := captureHandlers(t)
	lb := startBalancerOn(t, network, false, 30*time.Second, withHealth("flow", map[string]any{
		"passive": map[string]any{},
	}, a, b))
	h := onlyHandler(t, handlers)
	byName := map[string]*testUpstream{"a": a, "b": b}
	upOfName := map[string]*Upstream{"a": h.Upstreams[0], "b": h.Upstreams[1]}
	hostOfName := map[string]*Host{"a": h.Upstreams[0].host, "b": h.Upstreams[1].host}

	cl := newClient(t, lb.addr)
	first := cl.mustRoundTrip("hello")
	other := map[string]string{"a": "b", "b": "a"}[first]
	byName[first].close()
	if _, _, err := cl.roundTrip([]byte("lost"), 300*time.Millisecond); err == nil {
		t.Fatal("a datagram to the closed upstream was answered")
	}
	eventually(t, 2*time.Second, first+" marked down", func() bool { return !upOfName[first].healthy() })
	sent := hostOfName[first].datagramsSent.Load()
	for i := range 5 {
		if name := cl.mustRoundTrip(fmt.Sprintf("moved-%d", i)); name != other {
			t.Fatalf("after %s went down, the flow is answered by %s", first, name)
		}
	}
	if got := hostOfName[first].datagramsSent.Load(); got != sent {
		t.Errorf("%d datagrams still sent to %s", got-sent, first)
	}
	if f, o := hostOfName[first].Flows(), hostOfName[other].Flows(); f != 0 || o != 1 {
		t.Errorf("flows: %s %d, %s %d; want 0 and 1", first, f, other, o)
	}
}

// When every upstream is down the handler fails open and counts it, or with
// drop_when_all_down drops and counts that.
func TestAllUpstreamsDown(t *testing.T) {
	for _, network := range healthNetworks {
		for _, drop := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/drop_when_all_down=%v", network, drop), func(t *testing.T) {
				testAllUpstreamsDown(t, network, drop)
			})
		}
	}
}

func testAllUpstreamsDown(t *testing.T, network string, drop bool) {
	a, b := startUpstream(t, "a"), startUpstream(t, "b")
	handlers := captureHandlers(t)
	lb := startBalancerOn(t, network, false, 30*time.Second, withHealth("packet", map[string]any{
		// The upstreams answer traffic but fail every check.
		"active":             map[string]any{"send": "PING", "expect_exact": "never", "interval": "200ms"},
		"drop_when_all_down": drop,
	}, a, b))
	h := onlyHandler(t, handlers)
	eventually(t, 2*time.Second, "both upstreams down", func() bool {
		return !h.Upstreams[0].healthy() && !h.Upstreams[1].healthy()
	})
	if c := h.Upstreams[0].host.LastCheck(); !strings.HasPrefix(c.Reason, `reply did not match: "a|PING"`) {
		t.Errorf("last check of a: %+v, want the reply that did not match", c)
	}

	cl := newClient(t, lb.addr)
	if !drop {
		var names []string
		for i := range 6 {
			names = append(names, cl.mustRoundTrip(fmt.Sprintf("open-%d", i)))
		}
		if got := counts(names); got != "map[a:3 b:3]" {
			t.Errorf("failing open: %s, want a:3 b:3", got)
		}
		if got := h.allDownSent.Load(); got != 6 {
			t.Errorf("allDownSent = %d, want 6", got)
		}
		if got := h.Drops()["no_upstream"]; got != 0 {
			t.Errorf("no_upstream drops = %d, want 0", got)
		}
		return
	}
	for i := range 3 {
		if _, _, err := cl.roundTrip([]byte(fmt.Sprintf("drop-%d", i)), 200*time.Millisecond); !isTimeout(err) {
			t.Fatalf("datagram %d: %v, want it dropped", i, err)
		}
	}
	if got := h.Drops()["no_upstream"]; got != 3 {
		t.Errorf("no_upstream drops = %d, want 3", got)
	}
	if got := h.allDownSent.Load(); got != 0 {
		t.Errorf("allDownSent = %d, want 0", got)
	}
	if n := dataGot(a, "PING") + dataGot(b, "PING"); n != 0 {
		t.Errorf("upstreams received %d datagrams of traffic", n)
	}
}

// Health outlives reloads: the passive verdict lives in the shared host, and
// the active one in the prober that a reload with unchanged checks keeps, so
// a down upstream stays down. A config without active checks ignores the
// old verdict, and the prober stops.
func TestHealthSurvivesReload(t *testing.T) {
	needLinux(t)
	onHealthNetworks(t, testHealthSurvivesReload)
}

func testHealthSurvivesReload(t *testing.T, network string) {
	a, b, dead := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "dead")
	handlers := captureHandlers(t)
	cfg := withHealth("packet", map[string]any{
		"passive": map[string]any{"fail_duration": "10s"},
	}, a, b, dead)
	lb := startBalancerOn(t, network, false, 30*time.Second, cfg)
	reload := func(what string, handler any) *Handler {
		t.Helper()
		n := len(handlers())
		if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, handler), true); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		hs := handlers()
		if len(hs) != n+1 {
			t.Fatalf("%s: %d handlers provisioned, want 1", what, len(hs)-n)
		}
		return hs[n]
	}
	h0 := onlyHandler(t, handlers)
	hd := h0.Upstreams[2].host
	dead.close()

	cl := newClient(t, lb.addr)
	for i := 0; h0.Upstreams[2].healthy(); i++ {
		if i == 100 {
			t.Fatal("dead upstream never marked down")
		}
		_, _ = cl.conn.Write([]byte(fmt.Sprintf("find-%d", i)))
		time.Sleep(5 * time.Millisecond)
	}

	h1 := reload("reloading", cfg)
	if h1.Upstreams[2].host != hd {
		t.Fatal("the reloaded config has a new host for the same address")
	}
	if h1.Upstreams[2].healthy() {
		t.Fatal("the reload brought the down upstream up")
	}
	sent := hd.datagramsSent.Load()
	for i := range 12 {
		if name := newClient(t, lb.addr).mustRoundTrip(fmt.Sprintf("reloaded-%d", i)); name != "a" && name != "b" {
			t.Fatalf("reply from %s", name)
		}
	}
	if got := hd.datagramsSent.Load(); got != sent {
		t.Errorf("the new config sent %d datagrams to the down upstream", got-sent)
	}

	// Active checks: a config that fails every check, reloaded, keeps its
	// prober and verdict; a config without active checks ignores it.
	active := withHealth("packet", map[string]any{
		"active": map[string]any{"send": "PING", "expect_exact": "never", "interval": "200ms", "fails": 1},
	}, a, b)
	h2 := reload("loading active checks", active)
	ua := h2.Upstreams[0]
	eventually(t, 2*time.Second, "a down by active checks", func() bool { return !ua.healthy() })
	h3 := reload("reloading active checks", active)
	if h3.Upstreams[0].prober != ua.prober {
		t.Error("reloading the same active checks started a new prober")
	}
	if h3.Upstreams[0].healthy() {
		t.Error("reloading the same active checks brought a up")
	}
	h4 := reload("loading without health checks", handlerConfig("packet", "", a, b))
	if !h4.Upstreams[0].healthy() {
		t.Error("a is down for a handler without health checks")
	}
	if !ua.host.Healthy() {
		t.Error("a is reported down with no active checks left")
	}
	if _, ok := probers.References(ua.prober.check.key(ua)); ok {
		t.Error("the prober runs on with no handler holding it")
	}
}

// provisionErr provisions a handler from JSON and returns the error.
func provisionErr(t *testing.T, cfg string) (*Handler, error) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	h := new(Handler)
	if err := json.Unmarshal([]byte(cfg), h); err != nil {
		t.Fatal(err)
	}
	err := h.Provision(ctx)
	t.Cleanup(func() { _ = h.Cleanup() })
	return h, err
}

func TestHealthCheckConfig(t *testing.T) {
	up := fmt.Sprintf(`"upstreams": [{"dial": "127.0.0.1:%d"}]`, freeUDPPort(t))
	for _, tc := range []struct{ hc, want string }{
		{`"health_checks": {"active": {"send_hex": "zz"}}`, `health_checks.active.send_hex "zz": invalid hex`},
		{`"health_checks": {"active": {"send": "a", "send_hex": "61"}}`, `health_checks.active.send and send_hex: use one`},
		{`"health_checks": {"active": {"expect": "("}}`, `health_checks.active.expect "(": invalid regexp`},
		{`"health_checks": {"active": {"interval": "-1s"}}`, `health_checks.active.interval -1s: must not be negative`},
		{`"health_checks": {"active": {"interval": "1ms"}}`, `health_checks.active.interval 1ms: must be at least 10ms`},
		{`"health_checks": {"active": {"interval": "1s", "timeout": "2s"}}`, `health_checks.active.timeout 2s: must not exceed the interval (1s)`},
		{`"health_checks": {"active": {"timeout": "-1s"}}`, `health_checks.active.timeout -1s: must not be negative`},
		{`"health_checks": {"active": {"passes": -1}}`, `health_checks.active.passes -1`},
		{`"health_checks": {"active": {"fails": -2}}`, `health_checks.active.fails -2`},
		{`"health_checks": {"active": {"port": 70000}}`, `health_checks.active.port 70000: must be from 1 to 65535`},
		{`"health_checks": {"passive": {"reply_timeout": "-1s"}}`, `health_checks.passive.reply_timeout -1s: must not be negative`},
		{`"health_checks": {"passive": {"reply_timeout": "1ms"}}`, `health_checks.passive.reply_timeout 1ms: must be at least 10ms`},
		{`"health_checks": {"passive": {"max_fails": -1}}`, `health_checks.passive.max_fails -1`},
		{`"health_checks": {"passive": {"fail_duration": "-1s"}}`, `health_checks.passive.fail_duration -1s: must not be negative`},
		{`"read_buffer": -1`, `read_buffer -1: must not be negative`},
		{`"write_buffer": -5`, `write_buffer -5: must not be negative`},
	} {
		_, err := provisionErr(t, "{"+up+", "+tc.hc+"}")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error containing %q", tc.hc, err, tc.want)
		}
	}

	h, err := provisionErr(t, "{"+up+`, "health_checks": {"active": {}, "passive": {}}}`)
	if err != nil {
		t.Fatal(err)
	}
	a, p := h.HealthChecks.Active, h.HealthChecks.Passive
	if a.Interval != caddy.Duration(5*time.Second) || a.Timeout != caddy.Duration(2*time.Second) ||
		a.Passes != 1 || a.Fails != 1 || p.MaxFails != 1 || p.FailDuration != caddy.Duration(10*time.Second) ||
		p.ReplyTimeout != 0 || len(h.HealthChecks.active.probe) != 0 || h.HealthChecks.active.judged {
		t.Errorf("defaults: active %+v, passive %+v", a, p)
	}
	h, err = provisionErr(t, "{"+up+`, "health_checks": {"active": {"interval": "1s", "send_hex": "50494e47", "expect_prefix": "x"}}}`)
	if err != nil {
		t.Fatal(err)
	}
	if a := h.HealthChecks.Active; a.Timeout != caddy.Duration(time.Second) {
		t.Errorf("timeout %v, want the 1s interval", time.Duration(a.Timeout))
	}
	if c := h.HealthChecks.active; string(c.probe) != "PING" || !c.judged {
		t.Errorf("probe %q, judged %v", c.probe, c.judged)
	}
	// Stopping is prompt even while a probe waits for its reply.
	start := time.Now()
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("stopping the checks took %v", d)
	}
}

func TestHealthCheckMatching(t *testing.T) {
	for _, tc := range []struct {
		active map[string]any
		reply  string
		want   bool
	}{
		{map[string]any{"expect_exact": "PONG"}, "PONG", true},
		{map[string]any{"expect_exact": "PONG"}, "PONG!", false},
		{map[string]any{"expect_prefix": "PO"}, "PONG", true},
		{map[string]any{"expect_prefix": "PO"}, "xPONG", false},
		{map[string]any{"expect": "^P.NG$"}, "PANG", true},
		{map[string]any{"expect": "^P.NG$"}, "PANGS", false},
		{map[string]any{"expect": "NG$", "expect_prefix": "P"}, "PING", true},
		{map[string]any{"expect": "NG$", "expect_prefix": "P"}, "KING", false},
		{map[string]any{"expect": "^$"}, "", true},
		{map[string]any{}, "anything", true},
	} {
		b, _ := json.Marshal(tc.active)
		hc := new(HealthChecks)
		if err := json.Unmarshal([]byte(`{"active": `+string(b)+`}`), hc); err != nil {
			t.Fatal(err)
		}
		c, err := compileActive(hc.Active)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.matches([]byte(tc.reply)); got != tc.want {
			t.Errorf("%s with reply %q: matches %v, want %v", b, tc.reply, got, tc.want)
		}
	}
}

// observedLogger logs Debug and above to the returned observer.
func observedLogger() (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.DebugLevel)
	return zap.New(core), logs
}

// transitions are the up/down log entries, as "level message: reason
// (checks upstream)".
func transitions(logs *observer.ObservedLogs) []string {
	var out []string
	for _, e := range logs.All() {
		if e.Level < zapcore.InfoLevel {
			continue
		}
		m := e.ContextMap()
		out = append(out, fmt.Sprintf("%s %s: %v (%v %v)", e.Level, e.Message, m["reason"], m["checks"], m["upstream"]))
	}
	return out
}

// testProber is a prober of host that is not running.
func testProber(host *Host, logger *zap.Logger, passes, fails int) *prober {
	p := &prober{check: &activeCheck{ActiveHealthChecks: &ActiveHealthChecks{Passes: passes, Fails: fails}}, host: host}
	p.logger.Store(logger)
	return p
}

func TestActiveAccounting(t *testing.T) {
	logger, logs := observedLogger()
	host := &Host{addr: netip.MustParseAddrPort("192.0.2.1:53")}
	p := testProber(host, logger, 2, 3)
	u := &Upstream{host: host, prober: p}
	pass := CheckResult{Passed: true, Latency: time.Millisecond}
	fail := CheckResult{Reason: "no reply within 1s"}
	epoch := healthEpoch.Load()
	step := func(res CheckResult, wantHealthy bool) {
		t.Helper()
		p.result(res, res.Passed)
		if u.healthy() != wantHealthy || host.Healthy() != wantHealthy {
			t.Fatalf("after %+v: healthy %v, host healthy %v; want %v", res, u.healthy(), host.Healthy(), wantHealthy)
		}
		if *host.LastCheck() != res {
			t.Fatalf("last check %+v, want %+v", host.LastCheck(), res)
		}
	}
	step(fail, true)
	step(fail, true)
	step(pass, true) // breaks the streak
	step(fail, true)
	step(fail, true)
	step(fail, false)
	step(fail, false)
	step(pass, false)
	step(fail, false) // breaks the streak
	step(pass, false)
	step(pass, true)
	step(pass, true)
	if got := healthEpoch.Load() - epoch; got != 2 {
		t.Errorf("health epoch moved %d times, want 2", got)
	}
	if n, _, _ := host.health.latency.snapshot(); n != 5 {
		t.Errorf("%d latencies observed, want one per passing check (5)", n)
	}
	want := []string{
		"warn upstream is down: no reply within 1s (3 failing health checks in a row) (active 192.0.2.1:53)",
		"info upstream is up: 2 passing health checks in a row (active 192.0.2.1:53)",
	}
	if got := transitions(logs); !slices.Equal(got, want) {
		t.Errorf("logged %q, want %q", got, want)
	}

	// Two probers of one host, as for two handlers with different checks:
	// each has its own verdict, and the host is reported down while either
	// says so, until the one that says so stops.
	q := testProber(host, logger, 1, 1)
	v := &Upstream{host: host, prober: q}
	q.result(fail, false)
	if !u.healthy() || v.healthy() || host.Healthy() {
		t.Fatalf("one prober down: healthy %v and %v, host %v; want true, false, false", u.healthy(), v.healthy(), host.Healthy())
	}
	q.cancel, q.done = func() {}, make(chan struct{})
	close(q.done)
	if err := q.Destruct(); err != nil {
		t.Fatal(err)
	}
	if !host.Healthy() {
		t.Error("the host is reported down after its down prober stopped")
	}
}

func TestPassiveAccounting(t *testing.T) {
	logger, logs := observedLogger()
	host := &Host{addr: netip.MustParseAddrPort("192.0.2.2:53")}
	u := &Upstream{host: host, passiveChecks: true}
	const failDuration = 150 * time.Millisecond
	fail := func() { host.passiveFailure(logger, reasonPortUnreachable, 3, failDuration) }

	fail()
	fail()
	time.Sleep(failDuration + 20*time.Millisecond) // both forgotten
	fail()
	fail()
	if !u.healthy() {
		t.Fatal("down after 2 recent failures, want max_fails 3")
	}
	fail()
	if u.healthy() || host.Healthy() {
		t.Fatal("up after 3 failures within fail_duration")
	}
	if ignoring := (&Upstream{host: host}); !ignoring.healthy() {
		t.Error("a handler without passive checks heeds the passive verdict")
	}
	downAt := time.Now()
	fail() // not counted while down
	took := waitFor(t, time.Second, "up after fail_duration", u.healthy)
	if elapsed := time.Since(downAt); elapsed < failDuration-10*time.Millisecond || took > failDuration+200*time.Millisecond {
		t.Errorf("up after %v, want fail_duration %v", elapsed, failDuration)
	}
	fail()
	fail()
	if !u.healthy() {
		t.Fatal("failures before the down period counted after it")
	}
	want := []string{
		"warn upstream is down: ICMP port unreachable (3 failures within 150ms) (passive 192.0.2.2:53)",
		"info upstream is up: down for fail_duration 150ms (passive 192.0.2.2:53)",
	}
	if got := transitions(logs); !slices.Equal(got, want) {
		t.Errorf("logged %q, want %q", got, want)
	}

	// Active and passive combine: down while either says so.
	u.prober = testProber(host, logger, 1, 1)
	u.prober.result(CheckResult{Reason: "x"}, false)
	fail()
	if u.healthy() {
		t.Fatal("up while both say down")
	}
	u.prober.result(CheckResult{Passed: true}, false)
	if u.healthy() {
		t.Fatal("up while passive checks say down")
	}
	eventually(t, time.Second, "up when both say up", u.healthy)
}

// sentTo and replyFrom are on the data path: no allocation.
func TestReplyTimeoutBookkeeping(t *testing.T) {
	h := &Handler{HealthChecks: &HealthChecks{replyTimeout: time.Second}}
	h.HealthChecks.clock.Store(7)
	fl := &Flow{h: h}
	u, v := new(Upstream), new(Upstream)

	fl.sentTo(u)
	fl.sentTo(v) // the oldest unanswered datagram is watched
	if s, w := fl.health.since.Load(), fl.health.upstream.Load(); s != 7 || w != u {
		t.Fatalf("watching %p since %d, want %p since 7", w, s, u)
	}
	if fl.replyFrom(v) || fl.health.since.Load() == 0 {
		t.Fatal("a reply from another upstream cleared the watch")
	}
	if !fl.replyFrom(u) || fl.health.since.Load() != 0 {
		t.Fatal("the reply did not clear the watch")
	}
	if n := testing.AllocsPerRun(1000, func() { fl.sentTo(u); fl.replyFrom(u) }); n != 0 {
		t.Errorf("sentTo+replyFrom allocate %v times", n)
	}
	off := &Flow{h: &Handler{}}
	if n := testing.AllocsPerRun(1000, func() { off.sentTo(u); off.replyFrom(u) }); n != 0 {
		t.Errorf("sentTo+replyFrom without health checks allocate %v times", n)
	}
	if off.health.since.Load() != 0 {
		t.Error("watching without reply_timeout")
	}
}

// healthy is what the data path asks: no allocation.
func TestUpstreamHealthyAllocs(t *testing.T) {
	host := &Host{addr: netip.MustParseAddrPort("192.0.2.3:53")}
	u := &Upstream{host: host, prober: testProber(host, zap.NewNop(), 1, 1), passiveChecks: true}
	if n := testing.AllocsPerRun(1000, func() { _ = u.healthy() }); n != 0 {
		t.Errorf("healthy allocates %v times", n)
	}
}

// startServers loads a Caddy config with a layer4 server per handler, each
// on a fresh port of network, and returns their addresses. With logFile,
// logs go there as JSON, from Info up.
func startServers(t *testing.T, network, logFile string, handlers ...any) []string {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal(testConfigOn(network, "127.0.0.1:1", "", 30*time.Second, nil), &cfg); err != nil {
		t.Fatal(err)
	}
	if logFile != "" {
		logToFile(cfg, "INFO", logFile)
	}
	servers := map[string]any{}
	var addrs []string
	for i, h := range handlers {
		addr := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		addrs = append(addrs, addr)
		servers[fmt.Sprintf("srv%d", i)] = map[string]any{
			"listen":       []string{network + "/" + addr},
			"idle_timeout": "30s",
			"routes":       []any{map[string]any{"handle": []any{h}}},
		}
	}
	cfg["apps"] = map[string]any{"layer4": map[string]any{"servers": servers}}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	loadCaddy(t, b)
	return addrs
}

// Active health is per handler (defect 4): a handler whose checks fail on x
// stops sending to it; a handler without checks over the same upstreams
// keeps sending to x; a handler with identical checks shares the prober and
// agrees; one with other checks that x passes keeps it.
func TestActiveHealthPerHandler(t *testing.T) {
	onHealthNetworks(t, testActiveHealthPerHandler)
}

func testActiveHealthPerHandler(t *testing.T, network string) {
	x, y := startUpstream(t, "x"), startUpstream(t, "y")
	failsX := map[string]any{"active": map[string]any{"send": "PING", "expect_prefix": "y|", "interval": "100ms"}}
	passesX := map[string]any{"active": map[string]any{"send": "PING", "expect": `^[xy]\|PING$`, "interval": "100ms"}}
	checked := withHealth("packet", failsX, x, y)
	unchecked := handlerConfig("packet", "", x, y)
	same := withHealth("flow", failsX, x, y)
	other := withHealth("packet", passesX, x, y)
	handlers := captureHandlers(t)
	addrs := startServers(t, network, "", checked, unchecked, same, other)

	var hChecked, hSame, hOther, hUnchecked *Handler
	for _, h := range handlers() {
		switch {
		case h.HealthChecks == nil:
			hUnchecked = h
		case h.HealthChecks.Active.ExpectPrefix == "" && hOther == nil:
			hOther = h
		case h.Per == PerFlow:
			hSame = h
		default:
			hChecked = h
		}
	}
	if hChecked == nil || hSame == nil || hOther == nil || hUnchecked == nil {
		t.Fatalf("handlers not told apart: %d provisioned", len(handlers()))
	}
	eventually(t, 2*time.Second, "x down by the failing checks", func() bool { return !hChecked.Upstreams[0].healthy() })
	if hSame.Upstreams[0].prober != hChecked.Upstreams[0].prober {
		t.Error("handlers with identical checks run two probers")
	}
	if hOther.Upstreams[0].prober == hChecked.Upstreams[0].prober {
		t.Error("handlers with different checks share a prober")
	}
	// The other checks have passed by now: both probers check at once.
	eventually(t, 2*time.Second, "a passing check by the other checks", func() bool {
		c := hOther.Upstreams[0].host.LastCheck()
		return c != nil && c.Passed
	})
	if !hUnchecked.Upstreams[0].healthy() || !hOther.Upstreams[0].healthy() {
		t.Fatal("x is down for a handler whose checks do not fail it")
	}
	// /stabilize/upstreams reports both verdicts of x, and x as held down.
	hx := hChecked.Upstreams[0].host
	checks := hx.ActiveChecks()
	if len(checks) != 2 || checks[0].Healthy == checks[1].Healthy || hx.Healthy() {
		t.Errorf("x: active checks %+v, healthy %v; want one verdict down, one up, and x reported down", checks, hx.Healthy())
	}

	for _, tc := range []struct {
		name, addr, want string
	}{
		{"failing checks", addrs[0], "map[y:6]"},
		{"no checks", addrs[1], "map[x:3 y:3]"},
		{"checks that x passes", addrs[3], "map[x:3 y:3]"},
	} {
		cl := newClient(t, tc.addr)
		var names []string
		for i := range 6 {
			names = append(names, cl.mustRoundTrip(fmt.Sprintf("%s-%d", tc.name, i)))
		}
		if got := counts(names); got != tc.want {
			t.Errorf("handler with %s: %s, want %s", tc.name, got, tc.want)
		}
	}
	// Per flow, with the same checks: every new flow avoids x.
	for i := range 4 {
		if name := newClient(t, addrs[2]).mustRoundTrip(fmt.Sprintf("same-%d", i)); name != "y" {
			t.Errorf("flow %d of the handler with identical checks went to %s", i, name)
		}
	}
}

// The passive verdict is per upstream address, heeded only by handlers with
// passive checks: one that finds x silent marks it down for every handler
// with passive checks, and a handler without them keeps sending to x.
func TestPassiveHealthSharedByAddress(t *testing.T) {
	onHealthNetworks(t, testPassiveHealthSharedByAddress)
}

func testPassiveHealthSharedByAddress(t *testing.T, network string) {
	x, y := startUpstream(t, "x"), startUpstream(t, "y")
	x.silent.Store(true)
	watching := withHealth("packet", map[string]any{
		"passive": map[string]any{"reply_timeout": "100ms", "fail_duration": "10s"},
	}, x, y)
	heeding := withHealth("packet", map[string]any{"passive": map[string]any{"max_fails": 5}}, x, y)
	unchecked := handlerConfig("packet", "", x, y)
	handlers := captureHandlers(t)
	addrs := startServers(t, network, "", watching, heeding, unchecked)

	var hWatching, hHeeding, hUnchecked *Handler
	for _, h := range handlers() {
		switch {
		case h.HealthChecks == nil:
			hUnchecked = h
		case h.HealthChecks.replyTimeout > 0:
			hWatching = h
		default:
			hHeeding = h
		}
	}
	if hWatching == nil || hHeeding == nil || hUnchecked == nil {
		t.Fatalf("handlers not told apart: %d provisioned", len(handlers()))
	}
	cl := newClient(t, addrs[0])
	for i := range 2 { // one to each upstream
		_, _ = cl.conn.Write([]byte(fmt.Sprintf("watched-%d", i)))
	}
	eventually(t, 2*time.Second, "x down by reply_timeout", func() bool { return !hWatching.Upstreams[0].healthy() })
	if hHeeding.Upstreams[0].healthy() {
		t.Error("x is up for another handler with passive checks")
	}
	if !hUnchecked.Upstreams[0].healthy() {
		t.Fatal("x is down for a handler without passive checks")
	}
	before := x.got.Load()
	c := newClient(t, addrs[1])
	for i := range 4 {
		if name := c.mustRoundTrip(fmt.Sprintf("heeding-%d", i)); name != "y" {
			t.Fatalf("datagram %d of the heeding handler went to %s", i, name)
		}
	}
	if got := x.got.Load(); got != before {
		t.Errorf("x got %d datagrams from handlers that heed its passive verdict", got-before)
	}
	c = newClient(t, addrs[2])
	for i := range 4 {
		_, _ = c.conn.Write([]byte(fmt.Sprintf("unchecked-%d", i)))
	}
	eventually(t, 2*time.Second, "the handler without checks sending to x", func() bool { return x.got.Load() >= before+2 })
}

// startBigUpstream starts a UDP server on 127.0.0.1 that answers every
// datagram with size bytes.
func startBigUpstream(t *testing.T, size int) netip.AddrPort {
	t.Helper()
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	go func() {
		buf, big := make([]byte, 65535), make([]byte, size)
		for {
			_, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = conn.WriteToUDPAddrPort(big, from)
		}
	}()
	return conn.LocalAddr().(*net.UDPAddr).AddrPort()
}

// An upstream whose replies are all too large to relay is marked down by
// reply_timeout at once, for that reason, not for a missing reply (defect 9).
func TestPassiveReplyTooLarge(t *testing.T) {
	onHealthNetworks(t, testPassiveReplyTooLarge)
}

func testPassiveReplyTooLarge(t *testing.T, network string) {
	const replyTimeout = time.Second
	a := startUpstream(t, "a")
	big := startBigUpstream(t, ListenerBufferSize+1)
	h := withHealth("packet", map[string]any{"passive": map[string]any{
		"reply_timeout": replyTimeout.String(), "max_fails": 1, "fail_duration": "10s",
	}}, a)
	h["upstreams"] = []any{map[string]any{"dial": big.String()}, map[string]any{"dial": a.dial()}}
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	handlers := captureHandlers(t)
	addrs := startServers(t, network, logFile, h)
	hb := onlyHandler(t, handlers).Upstreams[0]

	// Spaced out, so that each datagram is watched.
	cl := newClient(t, addrs[0])
	start := time.Now()
	for i := 0; hb.healthy(); i++ {
		if i == 60 {
			t.Fatalf("still up after %v", time.Since(start))
		}
		if _, err := cl.conn.Write([]byte(fmt.Sprintf("req-%d", i))); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if took := time.Since(start); took >= replyTimeout {
		t.Errorf("down after %v, want before reply_timeout %v", took, replyTimeout)
	}
	if got := onlyHandler(t, handlers).Drops()["reply_too_large"]; got == 0 {
		t.Error("no reply_too_large drop counted")
	}
	var reasons []string
	eventually(t, 2*time.Second, "the down transition logged", func() bool {
		reasons = loggedDownReasons(t, logFile, big)
		return len(reasons) > 0
	})
	want := reasonReplyTooLarge + " (1 failure within 10s)"
	if !slices.Equal(reasons, []string{want}) {
		t.Errorf("logged reasons %q, want %q", reasons, want)
	}
}

// loggedDownReasons are the reasons of the passive "upstream is down" entries
// for upstream in a JSON log file.
func loggedDownReasons(t *testing.T, logFile string, upstream netip.AddrPort) []string {
	t.Helper()
	b, err := os.ReadFile(logFile)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var reasons []string
	for line := range bytes.Lines(b) {
		var e struct{ Msg, Upstream, Checks, Reason string }
		if json.Unmarshal(line, &e) == nil && e.Msg == "upstream is down" && e.Upstream == upstream.String() && e.Checks == "passive" {
			reasons = append(reasons, e.Reason)
		}
	}
	return reasons
}
