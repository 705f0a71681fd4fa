package stabilize

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/metrics" // admin.api.metrics: /metrics
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Fully qualified metric names, as scraped.
const (
	mDatagrams   = "caddy_stabilize_upstream_datagrams_total"
	mBytes       = "caddy_stabilize_upstream_bytes_total"
	mActiveFlows = "caddy_stabilize_upstream_active_flows"
	mHealthy     = "caddy_stabilize_upstream_healthy"
	mCheckTime   = "caddy_stabilize_upstream_health_check_duration_seconds"
	mDrops       = "caddy_stabilize_dropped_datagrams_total"
	mAllDown     = "caddy_stabilize_all_down_datagrams_total"
)

// adminClient talks to the admin endpoint without keeping connections: after
// a reload the old admin server keeps serving its connections for a while.
var adminClient = &http.Client{
	Timeout:   5 * time.Second,
	Transport: &http.Transport{DisableKeepAlives: true},
}

// metricFamilies is a scrape or gather result by metric name.
type metricFamilies map[string]*dto.MetricFamily

// scrape fetches and parses the admin endpoint's /metrics, failing the test
// unless it answers 200 (a duplicate series makes it answer 500).
func scrape(t *testing.T, admin string) metricFamilies {
	t.Helper()
	resp, err := adminClient.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatalf("scraping /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("scraping /metrics: %s: %s", resp.Status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return fams
}

// series returns the series of the metric name whose labels include the
// label name/value pairs kv.
func (m metricFamilies) series(name string, kv ...string) []*dto.Metric {
	fam := m[name]
	if fam == nil {
		return nil
	}
	var out []*dto.Metric
	for _, s := range fam.GetMetric() {
		if hasLabels(s, kv...) {
			out = append(out, s)
		}
	}
	return out
}

func hasLabels(s *dto.Metric, kv ...string) bool {
	for i := 0; i+1 < len(kv); i += 2 {
		found := false
		for _, lp := range s.GetLabel() {
			if lp.GetName() == kv[i] && lp.GetValue() == kv[i+1] {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// get is the value of the one counter or gauge series of name with the
// labels kv, failing the test if there is not exactly one.
func (m metricFamilies) get(t *testing.T, name string, kv ...string) float64 {
	t.Helper()
	ss := m.series(name, kv...)
	if len(ss) != 1 {
		t.Fatalf("%s%v: %d series, want 1", name, kv, len(ss))
	}
	s := ss[0]
	switch {
	case s.Counter != nil:
		return s.Counter.GetValue()
	case s.Gauge != nil:
		return s.Gauge.GetValue()
	}
	t.Fatalf("%s%v is neither a counter nor a gauge", name, kv)
	return 0
}

// labelValues is the set of values of label across the series of name.
func (m metricFamilies) labelValues(name, label string) []string {
	set := map[string]bool{}
	for _, s := range m.series(name) {
		for _, lp := range s.GetLabel() {
			if lp.GetName() == label {
				set[lp.GetValue()] = true
			}
		}
	}
	return slices.Sorted(maps.Keys(set))
}

// upstreamCounts are the traffic counters of one upstream.
type upstreamCounts struct{ dgTo, dgFrom, bTo, bFrom float64 }

func (m metricFamilies) upstream(t *testing.T, addr string) upstreamCounts {
	t.Helper()
	return upstreamCounts{
		dgTo:   m.get(t, mDatagrams, "upstream", addr, "direction", "to_upstream"),
		dgFrom: m.get(t, mDatagrams, "upstream", addr, "direction", "from_upstream"),
		bTo:    m.get(t, mBytes, "upstream", addr, "direction", "to_upstream"),
		bFrom:  m.get(t, mBytes, "upstream", addr, "direction", "from_upstream"),
	}
}

func (c upstreamCounts) minus(o upstreamCounts) upstreamCounts {
	return upstreamCounts{c.dgTo - o.dgTo, c.dgFrom - o.dgFrom, c.bTo - o.bTo, c.bFrom - o.bFrom}
}

// gather collects a registry directly, as the metrics handler would.
func gather(t *testing.T, ctx caddy.Context) metricFamilies {
	t.Helper()
	fams, err := ctx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatalf("gathering metrics: %v", err)
	}
	m := metricFamilies{}
	for _, f := range fams {
		m[f.GetName()] = f
	}
	return m
}

// settle calls get until ok holds for its result or 2 seconds pass, and
// returns the last result. An upstream's counters of a datagram are updated
// just after it is sent, so the reply may reach the client, and the test
// read the counters, a moment before.
func settle[T any](get func() T, ok func(T) bool) T {
	deadline := time.Now().Add(2 * time.Second)
	for {
		v := get()
		if ok(v) || time.Now().After(deadline) {
			return v
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// provisionIn provisions a handler from JSON in ctx, as Caddy would.
func provisionIn(t testing.TB, ctx caddy.Context, cfg string) *Handler {
	t.Helper()
	h := new(Handler)
	if err := json.Unmarshal([]byte(cfg), h); err != nil {
		t.Fatal(err)
	}
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Cleanup() })
	return h
}

func localAddr(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }

// TestMetricsTwoHandlersOneRegistry provisions two handlers that share an
// upstream in one config context: they must share one collector, be labeled
// "0" and "1", report the shared upstream once, and read the live counters
// at gather time.
func TestMetricsTwoHandlersOneRegistry(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	a, shared, b := localAddr(freeUDPPort(t)), localAddr(freeUDPPort(t)), localAddr(freeUDPPort(t))
	h0 := provisionIn(t, ctx, fmt.Sprintf(`{"upstreams":[{"dial":%q},{"dial":%q}]}`, a, shared))
	h1 := provisionIn(t, ctx, fmt.Sprintf(`{"upstreams":[{"dial":"udp/%s"},{"dial":%q}]}`, shared, b))

	c, err := collectorFor(ctx.GetMetricsRegistry())
	if err != nil {
		t.Fatalf("registering again: %v", err)
	}
	if len(c.handlers) != 2 || c.handlers[0].h != h0 || c.handlers[1].h != h1 {
		t.Fatalf("the registry's collector has handlers %v, want [%p %p]", c.handlers, h0, h1)
	}

	m := gather(t, ctx)
	if got := m.labelValues(mDatagrams, "upstream"); !slices.Equal(got, slices.Sorted(slices.Values([]string{a, shared, b}))) {
		t.Fatalf("upstreams reported: %v, want %s, %s, %s", got, a, shared, b)
	}
	for _, addr := range []string{a, shared, b} {
		if got := m.upstream(t, addr); got != (upstreamCounts{}) {
			t.Errorf("fresh upstream %s: %+v, want zeros", addr, got)
		}
		if got := m.get(t, mHealthy, "upstream", addr); got != 1 {
			t.Errorf("upstream %s healthy = %v, want 1", addr, got)
		}
		if got := m.get(t, mActiveFlows, "upstream", addr); got != 0 {
			t.Errorf("upstream %s active flows = %v, want 0", addr, got)
		}
	}
	if got := m.labelValues(mDrops, "handler"); !slices.Equal(got, []string{"0", "1"}) {
		t.Fatalf("handler labels %v, want [0 1]", got)
	}
	wantReasons := slices.Sorted(slices.Values(dropReasonNames[:]))
	if got := m.labelValues(mDrops, "reason"); !slices.Equal(got, wantReasons) {
		t.Fatalf("drop reasons %v, want %v", got, wantReasons)
	}
	if n := len(m.series(mDrops)); n != 2*int(numDropReasons) {
		t.Fatalf("%d drop series, want 2 handlers x %d reasons", n, numDropReasons)
	}
	if len(m.series(mCheckTime)) != 0 {
		t.Errorf("health check latency reported without active checks or observations")
	}

	// The collector reads the live atomics.
	h1.Upstreams[0].host.datagramsSent.Add(7)
	h1.Upstreams[0].host.bytesReceived.Add(700)
	h0.Upstreams[0].host.flows.Add(2)
	h0.Upstreams[0].host.health.down.Store(true)
	h1.drop(dropWriteError)
	h1.drop(dropWriteError)
	h0.drop(dropUnknownSource)
	h0.allDownSent.Add(3)
	m = gather(t, ctx)
	if got := m.upstream(t, shared); got != (upstreamCounts{dgTo: 7, bFrom: 700}) {
		t.Errorf("shared upstream: %+v, want 7 datagrams to, 700 bytes from", got)
	}
	if got := m.get(t, mActiveFlows, "upstream", a); got != 2 {
		t.Errorf("active flows of %s = %v, want 2", a, got)
	}
	if got := m.get(t, mHealthy, "upstream", a); got != 0 {
		t.Errorf("down upstream %s healthy = %v, want 0", a, got)
	}
	for _, w := range []struct {
		handler, reason string
		want            float64
	}{
		{"1", "write_error", 2}, {"0", "write_error", 0},
		{"0", "unknown_source", 1}, {"1", "unknown_source", 0},
	} {
		if got := m.get(t, mDrops, "handler", w.handler, "reason", w.reason); got != w.want {
			t.Errorf("drops{handler=%s,reason=%s} = %v, want %v", w.handler, w.reason, got, w.want)
		}
	}
	if got := m.get(t, mAllDown, "handler", "0"); got != 3 {
		t.Errorf("all_down{handler=0} = %v, want 3", got)
	}
	if got := m.get(t, mAllDown, "handler", "1"); got != 0 {
		t.Errorf("all_down{handler=1} = %v, want 0", got)
	}
	h0.Upstreams[0].host.flows.Add(-2)
	h0.Upstreams[0].host.health.down.Store(false)
}

// TestMetricsHealthCheckLatency checks the latency histogram of an upstream
// against observations made directly.
func TestMetricsHealthCheckLatency(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	a, b := localAddr(freeUDPPort(t)), localAddr(freeUDPPort(t))
	h := provisionIn(t, ctx, fmt.Sprintf(`{"upstreams":[{"dial":%q},{"dial":%q}]}`, a, b))
	lat := &h.Upstreams[0].host.health.latency
	for _, d := range []time.Duration{300 * time.Microsecond, 3 * time.Millisecond, 30 * time.Millisecond, 7 * time.Second} {
		lat.observe(d)
	}

	m := gather(t, ctx)
	ss := m.series(mCheckTime)
	if len(ss) != 1 || !hasLabels(ss[0], "upstream", a) {
		t.Fatalf("health check latency series: %v, want one for %s only", ss, a)
	}
	hist := ss[0].GetHistogram()
	if hist == nil {
		t.Fatalf("%s is not a histogram", mCheckTime)
	}
	if hist.GetSampleCount() != 4 {
		t.Errorf("count %d, want 4", hist.GetSampleCount())
	}
	if want := 7.0333; math.Abs(hist.GetSampleSum()-want) > 1e-9 {
		t.Errorf("sum %v s, want %v", hist.GetSampleSum(), want)
	}
	want := map[float64]uint64{.0005: 1, .001: 1, .0025: 1, .005: 2, .025: 2, .05: 3, 1: 3, 5: 3}
	for _, bk := range hist.GetBucket() {
		if w, ok := want[bk.GetUpperBound()]; ok && bk.GetCumulativeCount() != w {
			t.Errorf("bucket le=%v: %d, want %d", bk.GetUpperBound(), bk.GetCumulativeCount(), w)
		}
	}
	if len(hist.GetBucket()) != len(latencyBuckets) {
		t.Errorf("%d buckets, want %d", len(hist.GetBucket()), len(latencyBuckets))
	}
}

// TestMetricsCountTraffic scrapes the admin endpoint's /metrics around real
// traffic through Caddy: the counters of the upstream that served the flow
// move by exactly what was sent and received, the other's stay, and a
// truncated datagram is counted as a drop.
func TestMetricsCountTraffic(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b := startUpstream(t, "a"), startUpstream(t, "b")
		lb := startBalancerOn(t, network, true, time.Second, handlerConfig("flow", "", a, b))
		ups := map[string]*testUpstream{"a": a, "b": b}

		before := scrape(t, lb.admin)
		cl := newClient(t, lb.addr)
		const n = 25
		var name string
		var sent, received int
		for i := range n {
			if i == n-1 {
				// Cut to the listener's buffer size, so dropped; the next round
				// trip passes the same Handle loop, so it has been counted.
				if _, err := cl.conn.Write(make([]byte, 12000)); err != nil {
					t.Fatal(err)
				}
			}
			payload := fmt.Sprintf("datagram-%d", i)
			name = cl.mustRoundTrip(payload)
			sent += len(payload)
			received += len(name) + 1 + len(payload)
		}
		used := ups[name].addr.String()
		other := a.addr.String()
		if name == "a" {
			other = b.addr.String()
		}
		want := upstreamCounts{dgTo: n, dgFrom: n, bTo: float64(sent), bFrom: float64(received)}
		after := settle(func() metricFamilies { return scrape(t, lb.admin) }, func(m metricFamilies) bool {
			return m.upstream(t, used).minus(before.upstream(t, used)) == want
		})
		if got := after.upstream(t, used).minus(before.upstream(t, used)); got != want {
			t.Errorf("upstream %s (%s) moved by %+v, want %+v", name, used, got, want)
		}
		if got := after.upstream(t, other).minus(before.upstream(t, other)); got != (upstreamCounts{}) {
			t.Errorf("idle upstream %s moved by %+v", other, got)
		}
		if got := after.get(t, mActiveFlows, "upstream", used); got != 1 {
			t.Errorf("active flows of %s = %v, want 1", used, got)
		}
		if got := after.get(t, mActiveFlows, "upstream", other); got != 0 {
			t.Errorf("active flows of %s = %v, want 0", other, got)
		}
		for _, addr := range []string{used, other} {
			if got := after.get(t, mHealthy, "upstream", addr); got != 1 {
				t.Errorf("healthy{%s} = %v, want 1", addr, got)
			}
		}
		for _, r := range dropReasonNames {
			want := 0.0
			if r == "truncated" {
				want = 1
			}
			if got := after.get(t, mDrops, "handler", "0", "reason", r) - before.get(t, mDrops, "handler", "0", "reason", r); got != want {
				t.Errorf("drops{reason=%s} moved by %v, want %v", r, got, want)
			}
		}
		if got := after.get(t, mAllDown, "handler", "0"); got != 0 {
			t.Errorf("all_down = %v, want 0", got)
		}

		// The flow ends at the idle timeout, and so does its count.
		eventually(t, 5*time.Second, "the active flow gauge back to 0", func() bool {
			return scrape(t, lb.admin).get(t, mActiveFlows, "upstream", used) == 0
		})
	})
}

// serverSpec is one layer4 server of multiServerConfig.
type serverSpec struct {
	listen  string
	handler map[string]any
}

// multiServerConfig is like testConfigOn with one layer4 server per spec,
// each listening on network.
func multiServerConfig(network, adminAddr string, idle time.Duration, specs ...serverSpec) []byte {
	var cfg map[string]any
	if err := json.Unmarshal(testConfigOn(network, specs[0].listen, adminAddr, idle, specs[0].handler), &cfg); err != nil {
		panic(err)
	}
	servers := cfg["apps"].(map[string]any)["layer4"].(map[string]any)["servers"].(map[string]any)
	for i, s := range specs[1:] {
		servers[fmt.Sprintf("srv%d", i+1)] = map[string]any{
			"listen":       []string{network + "/" + s.listen},
			"idle_timeout": idle.String(),
			"routes":       []any{map[string]any{"handle": []any{s.handler}}},
		}
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		panic(err)
	}
	return b
}

// TestMetricsTwoHandlersAndReload runs two stabilize handlers that share an
// upstream, in two layer4 servers of one config, then reloads the config
// twice. Every scrape must succeed (a duplicate series would fail it), report
// each upstream once and both handlers; upstream counters carry over the
// reloads; a handler dropped from the config disappears from the metrics.
func TestMetricsTwoHandlersAndReload(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, shared, b := startUpstream(t, "a"), startUpstream(t, "shared"), startUpstream(t, "b")
		ups := map[string]*testUpstream{"a": a, "shared": shared, "b": b}
		listen0, listen1 := localAddr(freeUDPPort(t)), localAddr(freeUDPPort(t))
		admin := localAddr(freeTCPPort(t))
		both := multiServerConfig(network, admin, 30*time.Second,
			serverSpec{listen0, handlerConfig("flow", "", a, shared)},
			serverSpec{listen1, handlerConfig("packet", "", shared, b)})
		if err := caddy.Load(both, true); err != nil {
			t.Fatalf("loading config: %v", err)
		}
		t.Cleanup(func() {
			if err := caddy.Stop(); err != nil {
				t.Errorf("stopping caddy: %v", err)
			}
		})

		allAddrs := slices.Sorted(slices.Values([]string{a.addr.String(), shared.addr.String(), b.addr.String()}))
		consistent := func(m metricFamilies, handlers []string, addrs []string) {
			t.Helper()
			if got := m.labelValues(mDrops, "handler"); !slices.Equal(got, handlers) {
				t.Fatalf("handler labels %v, want %v", got, handlers)
			}
			if got := m.labelValues(mDatagrams, "upstream"); !slices.Equal(got, addrs) {
				t.Fatalf("upstreams %v, want %v", got, addrs)
			}
			for _, addr := range addrs {
				m.upstream(t, addr) // exactly one series each
				m.get(t, mHealthy, "upstream", addr)
				m.get(t, mActiveFlows, "upstream", addr)
			}
		}
		// traffic sends k round trips on a new flow to each listener and returns
		// the datagrams each upstream got.
		traffic := func(k int, listens ...string) map[string]float64 {
			t.Helper()
			got := map[string]float64{}
			for _, l := range listens {
				cl := newClient(t, l)
				for i := range k {
					got[cl.mustRoundTrip(fmt.Sprintf("%s-%d", l, i))]++
				}
			}
			return got
		}
		// scrapeMoved scrapes until the upstreams in names have moved by sent
		// since before, as settle does, and reports those that have not.
		scrapeMoved := func(before metricFamilies, sent map[string]float64, names ...string) metricFamilies {
			t.Helper()
			moved := func(m metricFamilies, name string) (d upstreamCounts, ok bool) {
				addr := ups[name].addr.String()
				d = m.upstream(t, addr).minus(before.upstream(t, addr))
				return d, d.dgTo == sent[name] && d.dgFrom == sent[name]
			}
			m := settle(func() metricFamilies { return scrape(t, admin) }, func(m metricFamilies) bool {
				for _, name := range names {
					if _, ok := moved(m, name); !ok {
						return false
					}
				}
				return true
			})
			for _, name := range names {
				if d, ok := moved(m, name); !ok {
					t.Errorf("upstream %s moved by %v to, %v from; want %v", name, d.dgTo, d.dgFrom, sent[name])
				}
			}
			return m
		}

		s1 := scrape(t, admin)
		consistent(s1, []string{"0", "1"}, allAddrs)
		sent := traffic(4, listen0, listen1)
		if sent["shared"] == 0 || sent["b"] == 0 {
			t.Fatalf("per packet round robin over shared and b gave %v", sent)
		}
		s2 := scrapeMoved(s1, sent, "a", "shared", "b")
		consistent(s2, []string{"0", "1"}, allAddrs)

		// Reload the same config: new handler instances, same hosts.
		if err := caddy.Load(both, true); err != nil {
			t.Fatalf("reloading: %v", err)
		}
		s3 := scrape(t, admin)
		consistent(s3, []string{"0", "1"}, allAddrs)
		scrapeMoved(s2, nil, "a", "shared", "b") // the counters carried over, unchanged
		sent = traffic(6, listen0, listen1)
		s4 := scrapeMoved(s3, sent, "a", "shared", "b")
		consistent(s4, []string{"0", "1"}, allAddrs)

		// Reload without the second server: its handler and b go away.
		if err := caddy.Load(multiServerConfig(network, admin, 30*time.Second,
			serverSpec{listen0, handlerConfig("flow", "", a, shared)}), true); err != nil {
			t.Fatalf("reloading with one server: %v", err)
		}
		kept := slices.Sorted(slices.Values([]string{a.addr.String(), shared.addr.String()}))
		var s5 metricFamilies
		// The old admin server may answer a scrape or two while it shuts down.
		eventually(t, 5*time.Second, "the metrics of the one-server config", func() bool {
			s5 = scrape(t, admin)
			return slices.Equal(s5.labelValues(mDrops, "handler"), []string{"0"}) &&
				slices.Equal(s5.labelValues(mDatagrams, "upstream"), kept)
		})
		consistent(s5, []string{"0"}, kept)
		for _, name := range []string{"a", "shared"} {
			addr := ups[name].addr.String()
			if got, want := s5.upstream(t, addr), s4.upstream(t, addr); got != want {
				t.Errorf("upstream %s after the reload: %+v, want %+v carried over", name, got, want)
			}
		}
		sent = traffic(3, listen0)
		s6 := scrapeMoved(s5, sent, "a", "shared")
		consistent(s6, []string{"0"}, kept)
	})
}

// TestMetricsActiveHealthChecks runs real active health checks: the live
// upstream's passing checks fill its latency histogram and its last_check,
// and the upstream that stops answering goes down in both the metrics and
// /stabilize/upstreams.
func TestMetricsActiveHealthChecks(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b := startUpstream(t, "a"), startUpstream(t, "b")
		h := handlerConfig("flow", "", a, b)
		h["health_checks"] = map[string]any{"active": map[string]any{
			"send": "ping", "expect": `^[ab]\|ping$`, "interval": "100ms", "timeout": "100ms",
		}}
		lb := startBalancerOn(t, network, true, 30*time.Second, h)
		aAddr, bAddr := a.addr.String(), b.addr.String()

		var m metricFamilies
		eventually(t, 5*time.Second, "3 passing checks of each upstream in the histogram", func() bool {
			m = scrape(t, lb.admin)
			for _, addr := range []string{aAddr, bAddr} {
				ss := m.series(mCheckTime, "upstream", addr)
				if len(ss) != 1 || ss[0].GetHistogram().GetSampleCount() < 3 {
					return false
				}
			}
			return true
		})
		hist := m.series(mCheckTime, "upstream", aAddr)[0].GetHistogram()
		if s := hist.GetSampleSum(); s <= 0 || s > float64(hist.GetSampleCount())*0.1 {
			t.Errorf("latency sum %v s for %d checks, want within (0, 100ms each]", s, hist.GetSampleCount())
		}
		if bk := hist.GetBucket(); len(bk) == 0 || bk[len(bk)-1].GetCumulativeCount() > hist.GetSampleCount() {
			t.Errorf("buckets %v exceed the count %d", bk, hist.GetSampleCount())
		}
		st, _ := getUpstreams(t, lb.admin)
		for _, u := range []*testUpstream{a, b} {
			s := statusOf(t, st, u.addr)
			if !s.Healthy || s.LastCheck == nil || !s.LastCheck.Passed || s.LastCheck.Latency <= 0 {
				t.Errorf("upstream %s: %+v, last check %+v; want healthy with a passed check", u.name, s, s.LastCheck)
			}
		}

		b.silent.Store(true) // b receives the probes but no longer replies
		eventually(t, 5*time.Second, "b reported down", func() bool {
			st, _ = getUpstreams(t, lb.admin)
			return !statusOf(t, st, b.addr).Healthy
		})
		if lc := statusOf(t, st, b.addr).LastCheck; lc == nil || lc.Passed || lc.Reason == "" {
			t.Errorf("b's last check %+v, want a failed check with a reason", lc)
		}
		m = scrape(t, lb.admin)
		if got := m.get(t, mHealthy, "upstream", bAddr); got != 0 {
			t.Errorf("healthy{b} = %v, want 0", got)
		}
		if got := m.get(t, mHealthy, "upstream", aAddr); got != 1 {
			t.Errorf("healthy{a} = %v, want 1", got)
		}
	})
}

// TestQUICDroppedDatagramsMetric: the datagrams a terminating transport
// drops are counted per listener and reason, read at scrape time, and
// carried over a reload with the transport: a send to a client address
// the listener socket cannot reach (write_error), and datagrams that found
// the queue to quic-go full (queue_full; counted where the queue is full,
// which a test cannot make quic-go fall behind to, so added here).
func TestQUICDroppedDatagramsMetric(t *testing.T) {
	const m = "caddy_stabilize_quic_dropped_datagrams_total"
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "a")
		h := quicHandler(t, "", "", nil, b.dial())
		lb := startBalancerOn(t, network, true, 30*time.Second, h)
		mustExchange(t, dialQUIC(t, lb.addr, nil, quicClientTLS(t)), []byte("hi"))
		key := network + "/" + lb.addr
		var tr *quicTransport
		quicTransports.Range(func(k, v any) bool {
			if k == key {
				tr = v.(*quicTransport)
			}
			return tr == nil
		})
		if tr == nil {
			t.Fatalf("no transport %s", key)
		}
		fams := scrape(t, lb.admin)
		if q, w := fams.get(t, m, "listener", key, "reason", "queue_full"), fams.get(t, m, "listener", key, "reason", "write_error"); q != 0 || w != 0 {
			t.Fatalf("queue_full %v, write_error %v before any drop", q, w)
		}
		_, _ = tr.conn.WriteTo([]byte("x"), &net.UDPAddr{IP: net.IPv6loopback, Port: 9}) // an IPv4 socket
		tr.conn.queueFull.Add(3)
		if err := caddy.Load(testConfigOn(network, lb.addr, lb.admin, 30*time.Second, h), true); err != nil {
			t.Fatal(err)
		}
		fams = settle(func() metricFamilies { return scrape(t, lb.admin) }, func(f metricFamilies) bool {
			return len(f.series(m, "listener", key)) == 2
		})
		if q, w := fams.get(t, m, "listener", key, "reason", "queue_full"), fams.get(t, m, "listener", key, "reason", "write_error"); q != 3 || w != 1 {
			t.Fatalf("after a reload: queue_full %v, write_error %v, want 3 and 1", q, w)
		}
	})
}

// TestMetricsNamedHandlers runs three named handlers, one per layer4
// server, whose servers caddy-l4 provisions in random order at every load:
// each handler's drops must carry its own name, load after load. Handler i
// keeps one flow (max_flows 1) and refuses i+1 more.
func TestMetricsNamedHandlers(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		up := startUpstream(t, "up")
		names := []string{"alpha", "beta", "gamma"}
		admin := localAddr(freeTCPPort(t))
		specs := make([]serverSpec, len(names))
		for i, name := range names {
			h := handlerConfig("flow", "", up)
			h["name"] = name
			h["max_flows"] = 1
			specs[i] = serverSpec{localAddr(freeUDPPort(t)), h}
		}
		for load := range 3 {
			if err := caddy.Load(multiServerConfig(network, admin, 30*time.Second, specs...), true); err != nil {
				t.Fatalf("load %d: %v", load, err)
			}
			for i, s := range specs {
				newClient(t, s.listen).mustRoundTrip(fmt.Sprintf("hold-%d-%d", load, i))
				for k := range i + 1 {
					if _, err := newClient(t, s.listen).conn.Write([]byte(fmt.Sprintf("refused-%d-%d", load, k))); err != nil {
						t.Fatal(err)
					}
				}
			}
			var m metricFamilies
			eventually(t, 5*time.Second, "each handler's refused flows under its name", func() bool {
				m = scrape(t, admin)
				if !slices.Equal(m.labelValues(mDrops, "handler"), names) {
					return false
				}
				for i, name := range names {
					if m.get(t, mDrops, "handler", name, "reason", "flow_limit") != float64(i+1) {
						return false
					}
				}
				return true
			})
			for i, name := range names {
				if got := m.get(t, mDrops, "handler", name, "reason", "flow_limit"); got != float64(i+1) {
					t.Errorf("load %d: handler %s refused %v flows, want %d", load, name, got, i+1)
				}
			}
			if err := caddy.Stop(); err != nil {
				t.Fatalf("stopping caddy: %v", err)
			}
		}
	})
}
