package stabilize

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// adminDo makes an admin API request and fails the test unless it is OK.
func adminDo(t *testing.T, method, url, body string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := adminClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %s", method, url, resp.Status)
	}
}

// ourGoroutines counts goroutines with a frame in this package, excluding
// the test's own and the drainers of caddy-l4's close notices (one per
// listener of a config, which outlives the config by seconds).
func ourGoroutines() int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "caddy-stabilize/stabilize.(*") && !strings.Contains(g, "_test.go") &&
			!strings.Contains(g, "drainCloseNotices") {
			n++
		}
	}
	return n
}

// sockets counts this process's open sockets.
func sockets(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count fds: %v", err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "socket:") {
			n++
		}
	}
	return n
}

func TestReloadKeepsFlowsOnTheirUpstreams(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b, c, d := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c"), startUpstream(t, "d")
		lb := startBalancerOn(t, network, true, 30*time.Second, handlerConfig("flow", "", a, b, c))
		upstreams := "http://" + lb.admin + "/config/apps/layer4/servers/srv0/routes/0/handle/0/upstreams"

		const flows = 20
		var (
			stop     atomic.Bool
			wg       sync.WaitGroup
			mu       sync.Mutex
			seen     = make([]map[string]int, flows)
			timeouts atomic.Int64
		)
		for i := range flows {
			seen[i] = map[string]int{}
			cl := newClient(t, lb.addr)
			wg.Go(func() {
				for j := 0; !stop.Load(); j++ {
					name, _, err := cl.roundTrip([]byte(fmt.Sprintf("flow-%d-%d", i, j)), 300*time.Millisecond)
					if err != nil {
						if !isTimeout(err) {
							t.Errorf("flow %d: %v", i, err)
							return
						}
						timeouts.Add(1) // a reply lost while the socket was re-bound
						continue
					}
					mu.Lock()
					seen[i][name]++
					mu.Unlock()
					time.Sleep(10 * time.Millisecond)
				}
			})
		}
		time.Sleep(300 * time.Millisecond)
		baseG, baseS := ourGoroutines(), sockets(t)

		for i := range 10 {
			if i%2 == 0 {
				adminDo(t, http.MethodPost, upstreams, fmt.Sprintf(`{"dial": %q}`, d.dial()))
			} else {
				adminDo(t, http.MethodDelete, upstreams+"/3", "")
			}
			time.Sleep(200 * time.Millisecond)
			if g := ourGoroutines(); g > baseG+10 {
				t.Errorf("after reload %d: %d goroutines of ours, %d before the reloads", i+1, g, baseG)
			}
			if s := sockets(t); s > baseS+10 {
				t.Errorf("after reload %d: %d sockets, %d before the reloads", i+1, s, baseS)
			}
		}
		time.Sleep(300 * time.Millisecond)
		stop.Store(true)
		wg.Wait()

		first := map[string]int{}
		for i, m := range seen {
			if len(m) != 1 {
				t.Errorf("flow %d moved between upstreams across reloads: %v", i, m)
			}
			for name := range m {
				first[name]++
			}
		}
		if first["d"] != 0 || len(first) != 3 {
			t.Errorf("flows spread %v, want them on a, b and c only", first)
		}
		t.Logf("%d replies lost across 10 reloads", timeouts.Load())
	})
}

func TestReloadMovesFlowsOffRemovedUpstream(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b := startUpstream(t, "a"), startUpstream(t, "b")
		lb := startBalancerOn(t, network, true, 30*time.Second, handlerConfig("flow", "", a, b))
		upstreams := "http://" + lb.admin + "/config/apps/layer4/servers/srv0/routes/0/handle/0/upstreams"

		c1, c2 := newClient(t, lb.addr), newClient(t, lb.addr)
		if n1, n2 := c1.mustRoundTrip("1"), c2.mustRoundTrip("2"); n1 != "a" || n2 != "b" {
			t.Fatalf("flows on %s and %s, want a and b", n1, n2)
		}
		adminDo(t, http.MethodDelete, upstreams+"/0", "")
		var name string
		eventually(t, 5*time.Second, "the flow on a removed upstream to continue", func() bool {
			n, _, err := c1.roundTrip([]byte("after"), 300*time.Millisecond)
			name = n
			return err == nil
		})
		if name != "b" {
			t.Fatalf("flow of removed upstream a continued on %q, want b", name)
		}
		if n := c2.mustRoundTrip("still"); n != "b" {
			t.Fatalf("flow on b moved to %s", n)
		}
	})
}

// goroutinesIn counts goroutines with a frame whose function name contains
// fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), fn+"(")
}

// A reload ends the flows whose Handle runs (on udp/ every live flow, on
// fastudp/ those younger than the hand-off): none of caddy-l4's per-flow
// goroutines stays parked in its packetConn.Close, whose notice the
// stopped server no longer reads (caddy-l4 v0.1.2, mholt/caddy-l4#462).
func TestReloadLeavesNoParkedFlows(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(PerFlow, "round_robin", a))
		const flows = 40 // more than caddy-l4's notice channel holds (10)
		for i := range flows {
			newClient(t, lb.addr).mustRoundTrip(fmt.Sprint("flow ", i))
		}
		const parked = "layer4.(*packetConn).Close"
		before := goroutinesIn(parked)
		for i := range 2 {
			cfg := testConfigOn(network, lb.addr, "", time.Duration(30+i)*time.Second, handlerConfig(PerFlow, "round_robin", a))
			if err := caddy.Load(cfg, true); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(time.Second) // what would park has parked by now
		if n := goroutinesIn(parked) - before; n > 0 {
			t.Fatalf("%d goroutines parked in caddy-l4's packetConn.Close after reloads with %d flows", n, flows)
		}
	})
}

// A reload ends the refused flows (over max_flows) at once, as it does the
// others: they would read the closed listener until caddy-l4's idle
// timeout, and at it send a close notice the stopped server no longer
// takes (caddy-l4 v0.1.2, mholt/caddy-l4#462).
func TestReloadEndsRefusedFlows(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		const inRefuse = "stabilize.(*Handler).refuse"
		before := goroutinesIn(inRefuse)
		a := startUpstream(t, "a")
		limited := func() map[string]any {
			h := handlerConfig(PerFlow, "round_robin", a)
			h["max_flows"] = 1
			return h
		}
		const idle = 5 * time.Second
		lb := startBalancerOn(t, network, false, idle, limited())
		newClient(t, lb.addr).mustRoundTrip("admitted")
		const refused = 30 // more than caddy-l4's notice channel holds (10)
		for range refused {
			if _, err := newClient(t, lb.addr).conn.Write([]byte("refused")); err != nil {
				t.Fatal(err)
			}
		}
		eventually(t, 2*time.Second, "refused flows read", func() bool { return goroutinesIn(inRefuse)-before >= refused/2 })
		if err := caddy.Load(testConfigOn(network, lb.addr, "", idle+time.Second, limited()), true); err != nil {
			t.Fatal(err)
		}
		eventually(t, time.Second, "the refused flows of the stopped server to end", func() bool {
			return goroutinesIn(inRefuse) == before
		})
	})
}

// parkedOnNotices counts caddy-l4 goroutines blocked sending a flow's close
// notice (packetConn.Read at its idle timeout, or Close): after their
// server stopped, nothing ever takes it (caddy-l4 v0.1.2,
// mholt/caddy-l4#462).
func parkedOnNotices() int {
	buf := make([]byte, 32<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		header, rest, _ := strings.Cut(g, "\n")
		if strings.Contains(header, "[chan send") && strings.HasPrefix(rest, "github.com/mholt/caddy-l4/layer4.(*packetConn).") {
			n++
		}
	}
	return n
}

// Reloads while new clients keep arriving leave no caddy-l4 goroutine
// parked on a close notice: not those of flows that ended while the old
// server, falling behind, had not yet taken their notices, nor those of
// flows the old server started just before it stopped.
func TestReloadUnderNewClientsLeavesNoParkedFlows(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		before := parkedOnNotices()
		a := startUpstream(t, "a")
		const idle = time.Second // shorter than fastHandoff
		lb := startBalancerOn(t, network, false, idle, handlerConfig(PerFlow, "round_robin", a))
		stop := newClientsFlood(t, lb.addr, 3)
		for i := range 3 {
			time.Sleep(200 * time.Millisecond)
			cfg := testConfigOn(network, lb.addr, "", idle+time.Duration(i+1)*time.Millisecond, handlerConfig(PerFlow, "round_robin", a))
			if err := caddy.Load(cfg, true); err != nil {
				t.Fatal(err)
			}
		}
		stop()
		time.Sleep(idle + time.Second) // every flow has ended
		// The live server may still be taking notices of its flows.
		deadline := time.Now().Add(10 * time.Second)
		for n := parkedOnNotices() - before; n > 0; n = parkedOnNotices() - before {
			if time.Now().After(deadline) {
				t.Fatalf("%d caddy-l4 goroutines parked on close notices after reloads under new clients", n)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
}

// A reload while new clients keep arriving leaves no flow open on the old
// handler: not those that opened after its Cleanup looked for them, nor
// those whose Handle began waiting after Cleanup's wake. They would stay
// until caddy-l4's idle timeout, each with its upstream socket, on a
// listener that has closed.
func TestReloadUnderNewClientsEndsOldFlows(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		a := startUpstream(t, "a")
		const idle = 10 * time.Second
		lb := startBalancerOn(t, network, false, idle, handlerConfig(PerFlow, "round_robin", a))
		defer newClientsFlood(t, lb.addr, 2)()
		for i := range 3 {
			time.Sleep(200 * time.Millisecond)
			old := tr.latest()
			cfg := testConfigOn(network, lb.addr, "", idle+time.Duration(i+1)*time.Millisecond, handlerConfig(PerFlow, "round_robin", a))
			if err := caddy.Load(cfg, true); err != nil {
				t.Fatal(err)
			}
			open := func() int {
				old.mu.Lock()
				defer old.mu.Unlock()
				n := 0
				for fl := range old.flows {
					if !fl.closed.Load() {
						n++
					}
				}
				return n
			}
			// Well within the idle timeout, which would end them anyway;
			// the flood's new flows compete for the source-port lock,
			// slowly under the race detector.
			deadline := time.Now().Add(idle - 2*time.Second)
			for open() > 0 && time.Now().Before(deadline) {
				time.Sleep(50 * time.Millisecond)
			}
			if n := open(); n > 0 {
				t.Fatalf("reload %d: %d flows still open on the old handler", i+1, n)
			}
		}
	})
}

// newClientsFlood sends one datagram from a new client socket after
// another to addr, from workers goroutines, until the returned stop is
// called.
func newClientsFlood(t *testing.T, addr string, workers int) (stop func()) {
	t.Helper()
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var stopped atomic.Bool
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for !stopped.Load() {
				c, err := net.DialUDP("udp", nil, raddr)
				if err != nil {
					continue
				}
				_, _ = c.Write([]byte("new client"))
				_ = c.Close()
			}
		})
	}
	return func() { stopped.Store(true); wg.Wait() }
}

// A reload that ends a flow (here the policy changes, so the flow has no
// successor) ends it at once: a datagram that arrives while its Handle
// wakes, or on fastudp/ through the socket, finds a closed flow, not a
// closed socket, and is no write_error.
func TestReloadEndedFlowCountsNoWriteErrors(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		tr := trackHandlers(t)
		a := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(per, "round_robin", a))
		const clients = 20
		var stop atomic.Bool
		var wg sync.WaitGroup
		defer func() { stop.Store(true); wg.Wait() }()
		cls := make([]*client, clients)
		for i := range cls {
			cls[i] = newClient(t, lb.addr)
			cls[i].mustRoundTrip(fmt.Sprint("open ", i))
		}
		// No replies: on udp/ those that find the old listener closed
		// are write errors too.
		a.silent.Store(true)
		for _, cl := range cls {
			wg.Go(func() {
				for !stop.Load() {
					_, _ = cl.conn.Write([]byte("during the reload"))
					time.Sleep(200 * time.Microsecond)
				}
			})
		}
		time.Sleep(50 * time.Millisecond)
		old := tr.latest()
		if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, handlerConfig(per, "random", a)), true); err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
		stop.Store(true)
		wg.Wait()
		if n := old.Drops()[dropWriteError.String()]; n > 0 {
			t.Fatalf("the old handler counted %d write_error drops for datagrams of its ending flows", n)
		}
		// The flood's backlog in the listener's receive buffer, then in the
		// upstream's, would drop the fresh client's datagram.
		socks := []netip.AddrPort{netip.MustParseAddrPort(lb.addr), a.addr}
		waitUDPDrained(t, 10*time.Second, socks...)
		a.silent.Store(false)
		if _, _, err := newClient(t, lb.addr).roundTrip([]byte("after the reload"), 2*time.Second); err != nil {
			t.Fatalf("round trip after the reload: %v%s", err, udpDropsNote(t, socks...))
		}
	})
}

// Reloads in quick succession, under live traffic from flows of every age
// (young ones whose Handle still reads them, and ones crossing the fastudp
// hand-off), leave no flow half-closed: every client's round trips go on
// once the reloads stop, and only the last handler has flows, all open, as
// many as the fastudp socket has endpoints and the upstreams count.
func TestBackToBackReloadsLeaveNoHalfClosedFlows(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		tr := trackHandlers(t)
		a, b := startUpstream(t, "a"), startUpstream(t, "b")
		const idle = 30 * time.Second
		lb := startBalancerOn(t, network, false, idle, handlerConfig(per, "", a, b))
		var (
			stop    atomic.Bool
			wg      sync.WaitGroup
			mu      sync.Mutex
			clients []*client
		)
		defer func() { stop.Store(true); wg.Wait() }()
		wg.Go(func() { // a new client every 100 ms, each in a loop of round trips
			for i := 0; i < 30 && !stop.Load(); i++ {
				cl := newClient(t, lb.addr)
				mu.Lock()
				clients = append(clients, cl)
				mu.Unlock()
				wg.Go(func() {
					for j := 0; !stop.Load(); j++ {
						_, _, _ = cl.roundTrip(fmt.Appendf(nil, "c%d-%d", i, j), 100*time.Millisecond)
						time.Sleep(5 * time.Millisecond)
					}
				})
				time.Sleep(100 * time.Millisecond)
			}
		})
		for i := range 10 {
			time.Sleep(250 * time.Millisecond)
			second := []*testUpstream{a, b}
			if i%2 == 0 {
				second = second[:1] // b's flows end
			}
			for _, ups := range [][]*testUpstream{{a, b}, second} {
				if err := caddy.Load(testConfigOn(network, lb.addr, "", idle, handlerConfig(per, "", ups...)), true); err != nil {
					t.Fatal(err)
				}
			}
		}
		stop.Store(true)
		wg.Wait()
		for i, cl := range clients {
			eventually(t, 3*time.Second, fmt.Sprintf("client %d's round trip after the reloads", i), func() bool {
				_, _, err := cl.roundTrip(fmt.Appendf(nil, "after-%d", i), 200*time.Millisecond)
				return err == nil
			})
		}
		last := tr.latest()
		tr.mu.Lock()
		hs := slices.Clone(tr.hs)
		tr.mu.Unlock()
		for _, w := range hs {
			h := w.Value()
			if h == nil || h == last {
				continue
			}
			h.mu.Lock()
			n := len(h.flows)
			h.mu.Unlock()
			if n > 0 {
				t.Errorf("a replaced handler still has %d flows", n)
			}
		}
		last.mu.Lock()
		defer last.mu.Unlock()
		open, onUpstreams := 0, int64(0)
		for fl := range last.flows {
			if !fl.closed.Load() {
				open++
			}
		}
		for _, u := range last.Upstreams {
			onUpstreams += u.host.Flows()
		}
		if open != len(last.flows) || open < len(clients) {
			t.Errorf("the last handler has %d flows, %d of them open, for %d clients", len(last.flows), open, len(clients))
		}
		if network == FastNetwork {
			if n := fastSocketAt(t, lb.addr).Endpoints(); n != open {
				t.Errorf("the fastudp socket has %d endpoints for %d open flows", n, open)
			}
		}
		if per != PerPacket && onUpstreams != int64(open) {
			t.Errorf("the upstreams count %d flows, the handler has %d open", onUpstreams, open)
		}
	})
}
