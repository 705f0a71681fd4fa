package stabilize

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// TestRoundRobin: per packet, the datagrams of one flow rotate over the
// upstreams; per flow, the flows do, and each stays on its upstream.
func TestRoundRobin(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(per, "round_robin", a, b, c))

		var names []string
		if per == PerPacket {
			cl := newClient(t, lb.addr)
			for i := range 90 {
				names = append(names, cl.mustRoundTrip(fmt.Sprintf("req-%d", i)))
			}
			for i, n := range names {
				if want := []string{"a", "b", "c"}[i%3]; n != want {
					t.Fatalf("datagram %d went to %s, want %s (rotation %s)", i, n, want, counts(names))
				}
			}
		} else {
			names = flowsTo(t, lb.addr, 30, 3)
			if got := counts(names); got != "map[a:10 b:10 c:10]" {
				t.Fatalf("30 flows spread %s, want 10/10/10", got)
			}
		}
		for _, u := range []*testUpstream{a, b, c} {
			if got := u.got.Load(); got != 30 {
				t.Errorf("upstream %s got %d datagrams, want 30", u.name, got)
			}
		}
	})
}

func TestPerPacketCounterSharedAcrossClients(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig("packet", "", a, b, c))

		c1, c2 := newClient(t, lb.addr), newClient(t, lb.addr)
		var names []string
		for i := range 30 {
			cl := c1
			if i%2 == 1 {
				cl = c2
			}
			names = append(names, cl.mustRoundTrip(fmt.Sprintf("req-%d", i)))
		}
		for i, n := range names {
			if want := []string{"a", "b", "c"}[i%3]; n != want {
				t.Fatalf("datagram %d went to %s, want %s", i, n, want)
			}
		}
	})
}

// flowsTo opens n flows, sends each k datagrams, and returns the upstream
// name of each flow, failing if a flow's datagrams reached several.
func flowsTo(t *testing.T, addr string, n, k int) []string {
	t.Helper()
	var names []string
	for i := range n {
		cl := newClient(t, addr)
		first := ""
		for j := range k {
			name := cl.mustRoundTrip(fmt.Sprintf("flow-%d-%d", i, j))
			if first == "" {
				first = name
			} else if name != first {
				t.Fatalf("flow %d moved from %s to %s", i, first, name)
			}
		}
		names = append(names, first)
	}
	return names
}

func TestWeightedRoundRobin(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b := startUpstream(t, "a"), startUpstream(t, "b")
		h := handlerConfig("flow", "weighted_round_robin", a, b)
		h["upstreams"] = []any{
			map[string]any{"dial": a.dial(), "weight": 3},
			map[string]any{"dial": b.dial()},
		}
		lb := startBalancerOn(t, network, false, 30*time.Second, h)

		names := flowsTo(t, lb.addr, 40, 2)
		if got := counts(names); got != "map[a:30 b:10]" {
			t.Fatalf("40 flows with weights 3:1 spread %s, want a:30 b:10", got)
		}
		// Smooth: the heavy upstream never takes more than 3 in a row.
		if strings.Contains(strings.Join(names, ""), "aaaa") {
			t.Errorf("weighted order is bursty: %v", names)
		}
	})
}

func TestLeastSessions(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
		lb := startBalancerOn(t, network, false, time.Second, handlerConfig("flow", "least_sessions", a, b, c))

		// Six flows: each new flow goes to an upstream with the fewest.
		var clients []*client
		var names []string
		for i := range 6 {
			cl := newClient(t, lb.addr)
			clients = append(clients, cl)
			names = append(names, cl.mustRoundTrip(fmt.Sprintf("open-%d", i)))
		}
		if got := counts(names); got != "map[a:2 b:2 c:2]" {
			t.Fatalf("6 flows spread %s, want 2/2/2", got)
		}

		// Keep the two flows on "a" alive while the others end at the idle
		// timeout; "a" then has the most live flows.
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) {
			for i, cl := range clients {
				if names[i] == "a" {
					cl.mustRoundTrip("keepalive")
				}
			}
			time.Sleep(300 * time.Millisecond)
		}
		var fresh []string
		for i := range 4 {
			fresh = append(fresh, newClient(t, lb.addr).mustRoundTrip(fmt.Sprintf("new-%d", i)))
		}
		if got := counts(fresh); got != "map[b:2 c:2]" {
			t.Fatalf("with 2 live flows on a and none elsewhere, 4 new flows went %s, want b:2 c:2", got)
		}
	})
}

func TestConcurrentFlows(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(per, "", a, b, c))

		const flows, trips = 50, 100
		errs := make(chan error, flows)
		var wg sync.WaitGroup
		start := time.Now()
		for i := range flows {
			cl := newClient(t, lb.addr)
			wg.Go(func() {
				for j := range trips {
					payload := []byte(fmt.Sprintf("flow-%d-trip-%d", i, j))
					var err error
					for range 5 { // loopback UDP may still drop under -race
						if _, _, err = cl.roundTrip(payload, time.Second); err == nil || !isTimeout(err) {
							break
						}
					}
					if err != nil {
						errs <- fmt.Errorf("flow %d trip %d: %w", i, j, err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if d := time.Since(start); d > 30*time.Second {
			t.Errorf("%d flows x %d round trips took %v", flows, trips, d)
		}
	})
}

// TestDatagramSizes sends datagrams of 0, 1, 8000 and 9000 bytes on one flow.
// The first three come back whole. 9000 is the listener's buffer size: on
// udp/ a datagram of that size may have been cut short, so it is dropped and
// counted as truncated; on fastudp/ truncation is detected exactly, so it
// reaches the upstream, whose 9002-byte reply ("a|" and the datagram) is
// longer than the reply buffer, so dropped and counted as reply_too_large.
func TestDatagramSizes(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, lb, h := startWithOne(t, network, per, nil)
		cl := newClient(t, lb.addr)

		big := bytes.Repeat([]byte("0123456789abcdef"), 500) // 8000 bytes
		for _, payload := range [][]byte{big, []byte("x"), {}, bytes.Repeat([]byte("z"), 8998)} {
			_, echo, err := cl.roundTrip(payload, 2*time.Second)
			if err != nil {
				t.Fatalf("%d-byte datagram: %v", len(payload), err)
			}
			if !bytes.Equal(echo, payload) {
				t.Fatalf("%d-byte datagram came back as %d bytes", len(payload), len(echo))
			}
			a.mu.Lock()
			last := len(a.last)
			a.mu.Unlock()
			if last != len(payload) {
				t.Fatalf("upstream received %d bytes, sent %d", last, len(payload))
			}
		}

		got := a.got.Load()
		if _, _, err := cl.roundTrip(make([]byte, ListenerBufferSize), 300*time.Millisecond); !isTimeout(err) {
			t.Fatalf("a 9000-byte datagram: %v, want no reply", err)
		}
		if network == FastNetwork {
			eventually(t, 2*time.Second, "the 9000-byte datagram upstream and its reply counted as too large", func() bool {
				return a.got.Load() == got+1 && h.Drops()["reply_too_large"] == 1
			})
			if d := h.Drops()["truncated"]; d != 0 {
				t.Errorf("%d datagrams counted as truncated, want 0 on %s", d, network)
			}
		} else {
			eventually(t, 2*time.Second, "the 9000-byte datagram counted as truncated", func() bool {
				return h.Drops()["truncated"] == 1
			})
			if n := a.got.Load(); n != got {
				t.Errorf("the upstream received the 9000-byte datagram on %s", network)
			}
		}
		cl.mustRoundTrip("still-serving")

		// The same as the first datagram of a new flow.
		got = a.got.Load()
		truncated := h.Drops()["truncated"]
		if _, err := newClient(t, lb.addr).conn.Write(make([]byte, ListenerBufferSize)); err != nil {
			t.Fatal(err)
		}
		if network == FastNetwork {
			eventually(t, 2*time.Second, "the upstream to receive a new flow's 9000-byte first datagram", func() bool {
				a.mu.Lock()
				defer a.mu.Unlock()
				return len(a.last) == ListenerBufferSize && a.got.Load() == got+1
			})
		} else {
			eventually(t, 2*time.Second, "a new flow's 9000-byte first datagram counted as truncated", func() bool {
				return h.Drops()["truncated"] == truncated+1
			})
			if n := a.got.Load(); n != got {
				t.Errorf("the upstream received a new flow's 9000-byte first datagram on %s", network)
			}
		}
	})
}

// TestTruncatedDatagramIsDropped: a datagram longer than the listener's
// buffer is dropped and counted, whether it opens a flow or not. On fastudp/,
// the first datagram of a new flow is counted by the socket (its metric
// caddy_stabilize_fastudp_dropped_datagrams_total), as no handler has it yet.
func TestTruncatedDatagramIsDropped(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, lb, h := startWithOne(t, network, per, nil)

		// The first datagram of a new flow.
		cl := newClient(t, lb.addr)
		if _, _, err := cl.roundTrip(make([]byte, 12000), 500*time.Millisecond); !isTimeout(err) {
			t.Fatalf("a 12000-byte datagram, truncated by the listener, got %v; want it dropped", err)
		}
		if network == FastNetwork {
			s := fastSocketAt(t, lb.addr)
			eventually(t, 2*time.Second, "the socket to count the truncated datagram", func() bool {
				_, truncated := s.Drops()
				return truncated == 1
			})
		} else {
			eventually(t, 2*time.Second, "the handler to count the truncated datagram", func() bool {
				return h.Drops()["truncated"] == 1
			})
		}
		cl.mustRoundTrip("still-serving")

		// A datagram of an established flow.
		before := h.Drops()["truncated"]
		if _, _, err := cl.roundTrip(make([]byte, 12000), 300*time.Millisecond); !isTimeout(err) {
			t.Fatalf("a 12000-byte datagram of an established flow: %v; want it dropped", err)
		}
		eventually(t, 2*time.Second, "the handler to count the truncated datagram", func() bool {
			return h.Drops()["truncated"] == before+1
		})
		if got := a.got.Load(); got != 1 {
			t.Fatalf("upstream received %d datagrams, want only the 1 that fit", got)
		}
		cl.mustRoundTrip("still-serving")
	})
}

func TestDeadUpstream(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, b, dead := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "dead")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(per, "", a, b, dead))
		dead.close() // its port now answers with ICMP port-unreachable

		// Concurrent flows, so the lost datagrams' timeouts overlap.
		var mu sync.Mutex
		var wg sync.WaitGroup
		ok, lost := 0, 0
		for i := range 30 {
			cl := newClient(t, lb.addr)
			wg.Go(func() {
				for j := range 6 {
					name, _, err := cl.roundTrip([]byte(fmt.Sprintf("%d-%d", i, j)), 300*time.Millisecond)
					mu.Lock()
					switch {
					case err == nil && (name == "a" || name == "b"):
						ok++
					case isTimeout(err):
						lost++
					default:
						t.Errorf("flow %d: %s, %v", i, name, err)
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		// Round robin over three: a third of the datagrams (per packet)
		// or of the flows (per flow) go to the dead upstream.
		if ok != 120 || lost != 60 {
			t.Fatalf("ok %d, lost %d; want every datagram sent to a or b answered (120) and 60 lost", ok, lost)
		}
		newClient(t, lb.addr).mustRoundTrip("listener-still-serves")
	})
}

func TestFlowsReleaseResources(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, b := startUpstream(t, "a"), startUpstream(t, "b")
		lb := startBalancerOn(t, network, false, time.Second, handlerConfig(per, "", a, b))
		newClient(t, lb.addr).mustRoundTrip("warm-up")
		time.Sleep(1500 * time.Millisecond)
		baseG, baseFD := runtime.NumGoroutine(), openFDs(t)

		for batch := range 5 {
			var cls []*client
			for i := range 100 {
				cl := newClient(t, lb.addr)
				cl.mustRoundTrip(fmt.Sprintf("%d-%d", batch, i))
				cls = append(cls, cl)
			}
			for _, cl := range cls {
				_ = cl.conn.Close()
			}
		}
		eventually(t, 10*time.Second, "goroutines and sockets back near the baseline", func() bool {
			return runtime.NumGoroutine() <= baseG+10 && openFDs(t) <= baseFD+10
		})
		if g := a.got.Load() + b.got.Load(); g != 501 {
			t.Fatalf("upstreams got %d datagrams, want 501", g)
		}
	})
}

func TestAdminAPIChangesUpstreams(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
		lb := startBalancerOn(t, network, true, 30*time.Second, handlerConfig(per, "", a, b))
		path := "http://" + lb.admin + "/config/apps/layer4/servers/srv0/routes/0/handle/0/upstreams"

		// spread sends n datagrams: per packet on one flow, per flow on
		// n new flows, so round robin spreads them the same way.
		spread := func(n int) string {
			cl := newClient(t, lb.addr)
			var names []string
			for i := range n {
				if per != PerPacket {
					cl = newClient(t, lb.addr)
				}
				names = append(names, cl.mustRoundTrip(fmt.Sprintf("req-%d", i)))
			}
			return counts(names)
		}

		if got := spread(6); got != "map[a:3 b:3]" {
			t.Fatalf("before: %s", got)
		}
		adminDo(t, http.MethodPost, path, fmt.Sprintf(`{"dial": %q}`, c.dial()))
		if got := spread(9); got != "map[a:3 b:3 c:3]" {
			t.Fatalf("after adding c: %s, want c to get a third", got)
		}
		adminDo(t, http.MethodDelete, path+"/0", "")
		before := a.got.Load()
		if got := spread(6); got != "map[b:3 c:3]" {
			t.Fatalf("after deleting a: %s", got)
		}
		if a.got.Load() != before {
			t.Fatal("a still receives traffic after it was deleted")
		}
	})
}

func TestRepliesOnlyFromUpstreams(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, lb, h := startWithOne(t, network, per, nil)
		cl := newClient(t, lb.addr)
		cl.mustRoundTrip("hello")

		// A stranger sends to the flow's upstream-facing socket.
		a.mu.Lock()
		var flowSocket netip.AddrPort
		for src := range a.sources {
			flowSocket = src
		}
		a.mu.Unlock()
		rogue, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer rogue.Close()
		if _, err := rogue.WriteToUDPAddrPort([]byte("evil|spoofed"), flowSocket); err != nil {
			t.Fatal(err)
		}
		if per == PerFlow && udpio.Connected {
			// The socket is connected to the upstream: the kernel drops the
			// stranger's datagram, uncounted.
			time.Sleep(100 * time.Millisecond)
		} else {
			eventually(t, 2*time.Second, "the stranger's datagram to be counted", func() bool {
				return h.Drops()["unknown_source"] == 1
			})
		}
		_ = cl.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if n, err := cl.conn.Read(cl.buf); err == nil {
			t.Fatalf("the client received %q from a stranger", cl.buf[:n])
		}
		cl.mustRoundTrip("still-served")
	})
}
