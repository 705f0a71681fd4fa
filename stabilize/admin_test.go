package stabilize

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// getUpstreams fetches /stabilize/upstreams, failing the test unless it
// answers 200 with JSON. It returns the decoded statuses and the raw objects.
func getUpstreams(t *testing.T, admin string) ([]upstreamStatus, []map[string]any) {
	t.Helper()
	resp, err := adminClient.Get("http://" + admin + "/stabilize/upstreams")
	if err != nil {
		t.Fatalf("GET /stabilize/upstreams: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /stabilize/upstreams: %s: %s", resp.Status, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	var st []upstreamStatus
	var raw []map[string]any
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("decoding %s: %v", body, err)
	}
	if err := json.Unmarshal(body, &raw); err != nil {
		t.Fatalf("decoding %s: %v", body, err)
	}
	return st, raw
}

// statusOf is the entry of addr, failing the test if there is none.
func statusOf(t *testing.T, st []upstreamStatus, addr netip.AddrPort) upstreamStatus {
	t.Helper()
	for _, s := range st {
		if s.Address == addr.String() {
			return s
		}
	}
	t.Fatalf("upstream %s not listed in %+v", addr, st)
	return upstreamStatus{}
}

// hostOf finds the shared state of the upstream at addr in the host pool.
func hostOf(t *testing.T, addr netip.AddrPort) *Host {
	t.Helper()
	var found *Host
	hosts.Range(func(key, val any) bool {
		if key == addr.String() {
			found = val.(*Host)
			return false
		}
		return true
	})
	if found == nil {
		t.Fatalf("no host %s in the pool", addr)
	}
	return found
}

// TestAdminUpstreams checks /stabilize/upstreams against live traffic: every
// upstream listed once, sorted by address, with its counters and flows, and
// the JSON field names; and that only GET is allowed.
func TestAdminUpstreams(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
		lb := startBalancerOn(t, network, true, 30*time.Second, handlerConfig("flow", "", a, b, c))
		ups := map[string]*testUpstream{"a": a, "b": b, "c": c}

		st, raw := getUpstreams(t, lb.admin)
		want := []netip.AddrPort{a.addr, b.addr, c.addr}
		slices.SortFunc(want, netip.AddrPort.Compare)
		var got []string
		for _, s := range st {
			got = append(got, s.Address)
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("listed %v, want %v (sorted)", got, want)
		}
		for _, s := range st {
			if want := (upstreamStatus{Address: s.Address, Healthy: true}); !reflect.DeepEqual(s, want) {
				t.Errorf("before traffic: %+v, want %+v", s, want)
			}
		}
		fields := []string{"active_flows", "address", "bytes_from_upstream", "bytes_to_upstream",
			"datagrams_from_upstream", "datagrams_to_upstream", "healthy", "last_check"}
		for _, obj := range raw {
			keys := slices.Sorted(maps.Keys(obj))
			if !slices.Equal(keys, fields) {
				t.Errorf("fields %v, want %v", keys, fields)
			}
			if v, ok := obj["last_check"]; !ok || v != nil {
				t.Errorf("last_check = %v, want null without active checks", v)
			}
		}

		// Two live flows of 5 and 3 datagrams: round robin puts them on two
		// different upstreams.
		sent := map[string][2]uint64{} // name: datagrams, bytes
		var replyBytes = map[string]uint64{}
		for i, k := range []int{5, 3} {
			cl := newClient(t, lb.addr)
			for j := range k {
				p := fmt.Sprintf("flow-%d-%d", i, j)
				name := cl.mustRoundTrip(p)
				s := sent[name]
				sent[name] = [2]uint64{s[0] + 1, s[1] + uint64(len(p))}
				replyBytes[name] += uint64(len(name) + 1 + len(p))
			}
		}
		if len(sent) != 2 {
			t.Fatalf("two flows went to %v, want two upstreams", sent)
		}
		wantStatus := map[string]upstreamStatus{}
		for name, u := range ups {
			want := upstreamStatus{Address: u.addr.String(), Healthy: true}
			if n := sent[name]; n[0] > 0 {
				want.ActiveFlows = 1
				want.DatagramsToUpstream, want.BytesToUpstream = n[0], n[1]
				want.DatagramsFromUpstream, want.BytesFromUpstream = n[0], replyBytes[name]
			}
			wantStatus[name] = want
		}
		matches := func(st []upstreamStatus) bool {
			for name, u := range ups {
				if !reflect.DeepEqual(statusOf(t, st, u.addr), wantStatus[name]) {
					return false
				}
			}
			return true
		}
		st = settle(func() []upstreamStatus { st, _ := getUpstreams(t, lb.admin); return st }, matches)
		if len(st) != 3 {
			t.Fatalf("listed %d upstreams after traffic, want 3", len(st))
		}
		for name, u := range ups {
			if s := statusOf(t, st, u.addr); !reflect.DeepEqual(s, wantStatus[name]) {
				t.Errorf("upstream %s: %+v, want %+v", name, s, wantStatus[name])
			}
		}

		for _, method := range []string{http.MethodPost, http.MethodDelete, http.MethodPut} {
			req, err := http.NewRequest(method, "http://"+lb.admin+"/stabilize/upstreams", strings.NewReader("{}"))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Content-Type", "application/json")
			resp, err := adminClient.Do(req)
			if err != nil {
				t.Fatalf("%s /stabilize/upstreams: %v", method, err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusMethodNotAllowed {
				t.Errorf("%s /stabilize/upstreams: %s, want 405", method, resp.Status)
			}
		}
	})
}

// TestAdminUpstreamsShowsDown forces an upstream down in its shared state, as
// a health check would, with a failed last check: the endpoint and the
// metrics report it down, and traffic avoids it.
func TestAdminUpstreamsShowsDown(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, b := startUpstream(t, "a"), startUpstream(t, "b")
		h := handlerConfig(per, "", a, b)
		h["health_checks"] = map[string]any{"passive": map[string]any{}} // heed the forced verdict
		lb := startBalancerOn(t, network, true, 30*time.Second, h)

		check := &CheckResult{Time: time.Now().UTC().Truncate(time.Second), Reason: "forced down by the test", Latency: 1500 * time.Microsecond}
		host := hostOf(t, b.addr)
		host.health.lastCheck.Store(check)
		host.health.down.Store(true)
		healthEpoch.Add(1)

		cl := newClient(t, lb.addr)
		for i := range 4 {
			if per != PerPacket {
				cl = newClient(t, lb.addr) // each new flow avoids b
			}
			if name := cl.mustRoundTrip(fmt.Sprintf("req-%d", i)); name != "a" {
				t.Fatalf("datagram %d went to %s, which is down", i, name)
			}
		}

		var raw []map[string]any
		st := settle(func() []upstreamStatus {
			var st []upstreamStatus
			st, raw = getUpstreams(t, lb.admin)
			return st
		}, func(st []upstreamStatus) bool { return statusOf(t, st, a.addr).DatagramsToUpstream == 4 })
		if s := statusOf(t, st, a.addr); !s.Healthy || s.DatagramsToUpstream != 4 || s.LastCheck != nil {
			t.Errorf("a: %+v, want healthy with 4 datagrams and no check", s)
		}
		s := statusOf(t, st, b.addr)
		if s.Healthy || s.DatagramsToUpstream != 0 {
			t.Errorf("b: %+v, want down with no datagrams", s)
		}
		if s.LastCheck == nil || !reflect.DeepEqual(*s.LastCheck, *check) {
			t.Errorf("b's last check: %+v, want %+v", s.LastCheck, check)
		}
		for _, obj := range raw {
			if obj["address"] == b.addr.String() {
				lc, _ := obj["last_check"].(map[string]any)
				if lc["passed"] != false || lc["reason"] != check.Reason || lc["latency_ns"] != float64(1500000) {
					t.Errorf("b's last_check JSON: %v", obj["last_check"])
				}
			}
		}

		m := scrape(t, lb.admin)
		if got := m.get(t, mHealthy, "upstream", b.addr.String()); got != 0 {
			t.Errorf("healthy{b} = %v, want 0", got)
		}
		if got := m.get(t, mHealthy, "upstream", a.addr.String()); got != 1 {
			t.Errorf("healthy{a} = %v, want 1", got)
		}
	})
}

// TestAdminUpstreamsPassiveDown runs real passive health checks: an upstream
// whose port is closed answers with ICMP port-unreachable, one failure marks
// it down, and the endpoint and the metrics report it down while the other
// upstream carries the traffic.
func TestAdminUpstreamsPassiveDown(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, dead := startUpstream(t, "a"), startUpstream(t, "dead")
		h := handlerConfig(per, "", a, dead)
		h["health_checks"] = map[string]any{"passive": map[string]any{"max_fails": 1, "fail_duration": "5s"}}
		lb := startBalancerOn(t, network, true, 30*time.Second, h)
		dead.close() // its port now answers with ICMP port-unreachable

		st, _ := getUpstreams(t, lb.admin)
		if s := statusOf(t, st, dead.addr); !s.Healthy {
			t.Fatalf("dead upstream down before any traffic: %+v", s)
		}
		cl := newClient(t, lb.addr)
		i := 0
		eventually(t, 4*time.Second, "the closed upstream reported down", func() bool {
			i++
			if per != PerPacket {
				cl = newClient(t, lb.addr) // round robin over new flows reaches dead
			}
			_, _, _ = cl.roundTrip([]byte(fmt.Sprintf("probe-%d", i)), 100*time.Millisecond)
			st, _ = getUpstreams(t, lb.admin)
			return !statusOf(t, st, dead.addr).Healthy
		})
		s := statusOf(t, st, dead.addr)
		if s.DatagramsToUpstream == 0 || s.DatagramsFromUpstream != 0 || s.LastCheck != nil {
			t.Errorf("dead upstream: %+v, want datagrams sent, none received, no active check", s)
		}
		if s := statusOf(t, st, a.addr); !s.Healthy {
			t.Errorf("live upstream: %+v, want healthy", s)
		}
		m := scrape(t, lb.admin)
		if got := m.get(t, mHealthy, "upstream", dead.addr.String()); got != 0 {
			t.Errorf("healthy{dead} = %v, want 0", got)
		}
		if got := m.get(t, mHealthy, "upstream", a.addr.String()); got != 1 {
			t.Errorf("healthy{a} = %v, want 1", got)
		}
		// While it is down, every datagram goes to a.
		for j := range 4 {
			if per != PerPacket {
				cl = newClient(t, lb.addr)
			}
			if name := cl.mustRoundTrip(fmt.Sprintf("after-%d", j)); name != "a" {
				t.Fatalf("datagram %d went to %s while it is down", j, name)
			}
		}
	})
}
