package stabilize

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Tests of known defects, each on every listener network and granularity it
// concerns. The tests that can panic the process run in a child process
// (inChild), so that a panic fails them only.

// TestEmptyReply sends an empty datagram to an upstream that echoes it: the
// client gets the empty reply, and the balancer keeps serving.
func TestEmptyReply(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		if !inChild(t) {
			return
		}
		up := startRawUpstream(t, true, false)
		lb := startBalancerOn(t, network, false, 30*time.Second, rawHandler(per, up))
		cl := newClient(t, lb.addr)
		for _, p := range []string{"first", "", "after-empty", ""} {
			if err := rawRoundTrip(cl, []byte(p), 2*time.Second); err != nil {
				t.Fatalf("%q: %v", p, err)
			}
		}
	})
}

// TestEmptyDatagramAfterPause sends an empty datagram some time after the
// flow's previous one: it is forwarded like any other, and the flow goes on
// on the same upstream-facing socket. caddy-l4 reports an empty datagram as
// io.EOF; the end of the flow is an io.EOF too, but only after the idle
// timeout.
func TestEmptyDatagramAfterPause(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		up := startRawUpstream(t, false, true)
		lb := startBalancerOn(t, network, false, 30*time.Second, rawHandler(per, up))
		cl := newClient(t, lb.addr)
		for i, p := range []string{"first", "", "third"} {
			if i > 0 {
				time.Sleep(300 * time.Millisecond)
			}
			if _, err := cl.conn.Write([]byte(p)); err != nil {
				t.Fatal(err)
			}
			eventually(t, 2*time.Second, fmt.Sprintf("the upstream to receive datagram %d (%q)", i+1, p), func() bool {
				return up.got.Load() == int64(i+1)
			})
			if got := up.recorded()[i]; string(got) != p {
				t.Fatalf("datagram %d reached the upstream as %q, want %q", i+1, got, p)
			}
		}
		if n := up.sourceCount(); n != 1 {
			t.Errorf("the upstream saw the flow from %d sockets, want 1", n)
		}
	})
}

// rawRoundTrip sends payload and waits for a reply equal to it.
func rawRoundTrip(cl *client, payload []byte, timeout time.Duration) error {
	if _, err := cl.conn.Write(payload); err != nil {
		return err
	}
	if err := cl.conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	n, err := cl.conn.Read(cl.buf)
	if err != nil {
		return err
	}
	if !bytes.Equal(cl.buf[:n], payload) {
		return fmt.Errorf("reply of %d bytes to a %d-byte datagram", n, len(payload))
	}
	return nil
}

// maxForwarded is the longest datagram a listener on network forwards: on
// udp/ a datagram of the listener's buffer size may have been cut short, so
// it is dropped; fastudp/ detects truncation exactly (README, Limits).
func maxForwarded(network string) int {
	if network == FastNetwork {
		return ListenerBufferSize
	}
	return ListenerBufferSize - 1
}

// TestEverySize fuzzes the listener's, the fast socket's and the reply
// reactor's batch paths with every datagram size from 0 to 9001, each with
// its own pseudo-random payload, through two upstreams that echo the raw
// datagram. Every datagram up to maxForwarded comes back whole; longer ones
// are dropped, counted as truncated and not answered.
func TestEverySize(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		if !inChild(t) {
			return
		}
		const top, clients = ListenerBufferSize + 1, 8
		tr := trackHandlers(t)
		u1, u2 := startRawUpstream(t, true, false), startRawUpstream(t, true, false)
		lb := startBalancerOn(t, network, false, 30*time.Second, rawHandler(per, u1, u2))
		h := tr.latest()
		random := make([]byte, top+1024)
		rng := rand.New(rand.NewPCG(1, 2))
		for i := range random {
			random[i] = byte(rng.Uint32())
		}
		payloadOf := func(size int) []byte {
			off := (size * 7919) % 1024
			return random[off : off+size]
		}

		var mu sync.Mutex
		forwarded, retries := 0, 0
		var wg sync.WaitGroup
		start := time.Now()
		for k := range clients {
			cl := newClient(t, lb.addr)
			wg.Go(func() {
				for size := k; size <= top; size += clients {
					p := payloadOf(size)
					if size > maxForwarded(network) {
						if _, err := cl.conn.Write(p); err != nil {
							t.Error(err)
							return
						}
						_ = cl.conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
						if n, err := cl.conn.Read(cl.buf); err == nil && n == size {
							t.Errorf("a %d-byte datagram was answered", size)
						}
						continue
					}
					var err error
					for try := range 4 { // loopback may drop under -race
						if try > 0 {
							mu.Lock()
							retries++
							mu.Unlock()
						}
						if err = sizedRoundTrip(cl, p, time.Second); err == nil || !isTimeout(err) {
							break
						}
					}
					if err != nil {
						t.Errorf("%d bytes: %v", size, err)
						return
					}
					mu.Lock()
					forwarded++
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		t.Logf("%d sizes round trip in %v, %d retries", forwarded, time.Since(start).Round(time.Millisecond), retries)
		if want := maxForwarded(network) + 1; forwarded != want {
			t.Errorf("%d sizes came back, want %d", forwarded, want)
		}
		want := uint64(top - maxForwarded(network))
		eventually(t, 2*time.Second, fmt.Sprintf("%d datagrams counted as truncated", want), func() bool {
			return h.Drops()["truncated"] == want
		})
		if got := u1.got.Load() + u2.got.Load(); got < int64(forwarded) || got > int64(forwarded+retries) {
			t.Errorf("the upstreams received %d datagrams, want %d (+%d retries), none longer than %d",
				got, forwarded, retries, maxForwarded(network))
		}
	})
}

// sizedRoundTrip is rawRoundTrip that skips late replies to earlier, retried
// datagrams of another size; a reply of the same size must match.
func sizedRoundTrip(cl *client, payload []byte, timeout time.Duration) error {
	if _, err := cl.conn.Write(payload); err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		if err := cl.conn.SetReadDeadline(deadline); err != nil {
			return err
		}
		n, err := cl.conn.Read(cl.buf)
		if err != nil {
			return err
		}
		if n != len(payload) {
			continue // a late reply to an earlier datagram
		}
		if !bytes.Equal(cl.buf[:n], payload) {
			return fmt.Errorf("the %d-byte reply differs from the datagram", n)
		}
		return nil
	}
}

// TestAllDownEstablishedFlows: when an active check fails for every
// upstream, the datagrams of established flows follow drop_when_all_down as
// new ones do: with it, they are dropped and counted as no_upstream; without
// it, they are sent and counted as sent while all were down.
func TestAllDownEstablishedFlows(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		for _, drop := range []bool{true, false} {
			name := "fail_open"
			if drop {
				name = "drop_when_all_down"
			}
			t.Run(name, func(t *testing.T) {
				tr := trackHandlers(t)
				a, b := startUpstream(t, "a"), startUpstream(t, "b")
				h := handlerConfig(per, "", a, b)
				h["health_checks"] = map[string]any{
					"drop_when_all_down": drop,
					"active": map[string]any{
						"send": "PING", "expect": `\|PING$`,
						"interval": "100ms", "timeout": "100ms", "passes": 1, "fails": 1,
					},
				}
				lb := startBalancerOn(t, network, false, 30*time.Second, h)
				hd := tr.latest()
				cls := []*client{newClient(t, lb.addr), newClient(t, lb.addr)}
				for i, cl := range cls {
					cl.mustRoundTrip(fmt.Sprintf("up-%d", i))
				}

				a.silent.Store(true) // the probes, and everything else, go unanswered
				b.silent.Store(true)
				eventually(t, 3*time.Second, "every upstream down", func() bool {
					return !hd.Upstreams[0].host.Healthy() && !hd.Upstreams[1].host.Healthy()
				})
				const each = 5
				for i, cl := range cls {
					for j := range each {
						if _, err := cl.conn.Write([]byte(fmt.Sprintf("down-%d-%d", i, j))); err != nil {
							t.Fatal(err)
						}
					}
				}
				sent := len(cls) * each
				reached := func() int {
					n := 0
					for i := range cls {
						for j := range each {
							p := fmt.Sprintf("down-%d-%d", i, j)
							n += a.gotPayload(p) + b.gotPayload(p)
						}
					}
					return n
				}
				if drop {
					if !waitUntil(2*time.Second, func() bool { return hd.Drops()["no_upstream"] == uint64(sent) }) {
						t.Errorf("%d datagrams counted as no_upstream, want %d", hd.Drops()["no_upstream"], sent)
					}
					time.Sleep(100 * time.Millisecond)
					if n := reached(); n != 0 {
						t.Errorf("%d of %d datagrams sent while every upstream was down reached one, with drop_when_all_down", n, sent)
					}
					if n := hd.allDownSent.Load(); n != 0 {
						t.Errorf("%d datagrams counted as sent while all were down, with drop_when_all_down", n)
					}
				} else {
					eventually(t, 2*time.Second, fmt.Sprintf("%d datagrams upstream", sent), func() bool {
						return reached() == sent
					})
					if n := hd.allDownSent.Load(); n != uint64(sent) {
						t.Errorf("%d datagrams counted as sent while all were down (%s), want %d", n, mAllDown, sent)
					}
					if n := hd.Drops()["no_upstream"]; n != 0 {
						t.Errorf("%d datagrams dropped as no_upstream without drop_when_all_down", n)
					}
				}
			})
		}
	})
}

// TestReloadsUnderTraffic makes 200 config changes through the admin API,
// alternately adding and removing an upstream that no flow is on, under
// steady request/reply traffic from a few clients while other clients come,
// make one round trip, and go. The changes are to the upstreams of the
// server under traffic (own_upstreams), or to a second server
// (other_server), so that the config of the one under traffic stays the
// same. Then:
//   - lost_replies: on fastudp/, no round trip is lost; a flow whose
//     upstream is still configured keeps its socket across the reloads. On
//     udp/ the loss is logged (README, Reloads).
//   - affinity_bounded: the affinity entries of clients that went away are
//     forgotten once their flows would have ended.
//   - handlers_collected and heap_bounded: old handler instances become
//     unreachable, and the heap does not grow with the reloads.
func TestReloadsUnderTraffic(t *testing.T) {
	forPaths(t, []string{PerFlow}, func(t *testing.T, network, per string) {
		for _, changed := range []string{"own_upstreams", "other_server"} {
			t.Run(changed, func(t *testing.T) { reloadsUnderTraffic(t, network, per, changed == "other_server") })
		}
	})
}

// reloadsUnderTraffic is TestReloadsUnderTraffic on network. With
// otherServer, the changes are to a second layer4 server, so the config of
// the server under traffic stays the same.
func reloadsUnderTraffic(t *testing.T, network, per string, otherServer bool) {
	const reloads, steady = 200, 4
	const idle = time.Second
	tr := trackHandlers(t)
	a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
	fixed := []*testUpstream{a, b}    // the upstreams of the flows
	changing, server := fixed, "srv0" // the list that changes, and its server
	var lb *balancer
	if otherServer {
		changing, server = []*testUpstream{startUpstream(t, "d")}, "srv1"
		lb = &balancer{addr: localAddr(freeUDPPort(t)), admin: localAddr(freeTCPPort(t))}
		cfg := multiServerConfig(network, lb.admin, idle,
			serverSpec{lb.addr, handlerConfig(per, "", fixed...)},
			serverSpec{localAddr(freeUDPPort(t)), handlerConfig(per, "", changing...)})
		if err := caddy.Load(cfg, true); err != nil {
			t.Fatalf("loading config: %v", err)
		}
		t.Cleanup(func() { _ = caddy.Stop() })
	} else {
		lb = startBalancerOn(t, network, true, idle, handlerConfig(per, "", fixed...))
	}
	upstreams := "http://" + lb.admin + "/config/apps/layer4/servers/" + server + "/routes/0/handle/0/upstreams"

	var (
		stop      = make(chan struct{})
		wg        sync.WaitGroup
		mu        sync.Mutex
		trips     int
		lost      int
		moved     int
		firstName = make([]string, steady)
	)
	defer func() { // also when the test fails early
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}()
	// A reply later than replyWait counts as lost. On fastudp/, where none
	// may be lost, a slow machine gets a second to answer; on udp/, where
	// replies in flight are lost at each reload and the count is only
	// logged, a quarter of one keeps the test short.
	replyWait := 250 * time.Millisecond
	if network == FastNetwork {
		replyWait = time.Second
	}
	for i := range steady {
		cl := newClient(t, lb.addr)
		firstName[i] = cl.mustRoundTrip(fmt.Sprintf("steady-%d", i))
		wg.Go(func() {
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				name, _, err := cl.roundTrip([]byte(fmt.Sprintf("steady-%d-%d", i, j)), replyWait)
				mu.Lock()
				trips++
				switch {
				case isTimeout(err):
					lost++
				case err != nil:
					t.Errorf("steady flow %d: %v", i, err)
				case name != firstName[i]:
					moved++
				}
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		})
	}
	time.Sleep(200 * time.Millisecond)
	collectGarbage()
	heapBefore := heapAlloc()
	sourcesBefore := sourcesOf(a) + sourcesOf(b)

	start := time.Now()
	for i := range reloads {
		list := changing
		if i%2 == 0 {
			list = append(slices.Clone(changing), c)
		}
		adminReplace(t, upstreams, handlerConfig("", "", list...)["upstreams"])
		// A client that comes, makes one round trip and goes.
		visitor := newClient(t, lb.addr)
		_, _, _ = visitor.roundTrip([]byte(fmt.Sprintf("visitor-%d", i)), 300*time.Millisecond)
		_ = visitor.conn.Close()
	}
	took := time.Since(start)
	close(stop)
	wg.Wait()
	sourcesAfter := sourcesOf(a) + sourcesOf(b)
	t.Logf("%d config changes in %v; %d round trips, %d lost, %d moved; c got %d datagrams",
		reloads, took.Round(time.Millisecond), trips, lost, moved, c.got.Load())

	t.Run("lost_replies", func(t *testing.T) {
		if moved != 0 {
			t.Errorf("%d round trips answered by another upstream than the flow's", moved)
		}
		if c.got.Load() != 0 {
			t.Errorf("c, which no steady flow is on, got %d datagrams", c.got.Load())
		}
		// Each visitor opens one socket; each steady flow should keep its own.
		newSockets := sourcesAfter - sourcesBefore
		if network != FastNetwork {
			t.Logf("udp/: %d of %d round trips lost across %d reloads; %d new upstream-facing sockets for %d visitors",
				lost, trips, reloads, newSockets, reloads)
			return
		}
		if lost != 0 {
			t.Errorf("%d of %d round trips lost across %d reloads, want none on %s", lost, trips, reloads, network)
		}
		if newSockets > reloads+2 {
			t.Errorf("the upstreams saw %d new sockets for %d visitors: the steady flows did not keep their sockets across the reloads",
				newSockets, reloads)
		}
	})

	// Every flow of a visitor has ended by now.
	time.Sleep(2*idle + 500*time.Millisecond)
	t.Run("affinity_bounded", func(t *testing.T) {
		if n := affinityEntries(); n > steady+5 {
			t.Errorf("%d affinity entries after %d visitors went away and %d steady flows ended, want at most %d",
				n, reloads, steady, steady+5)
		}
	})
	t.Run("handlers_collected", func(t *testing.T) {
		collectGarbage()
		live, total := tr.live()
		if total < reloads {
			t.Fatalf("%d handlers provisioned, want at least %d", total, reloads)
		}
		if live > 5 {
			t.Errorf("%d of %d handler instances are still reachable after the reloads", live, total)
		}
	})
	t.Run("heap_bounded", func(t *testing.T) {
		collectGarbage()
		grew := int64(heapAlloc()) - int64(heapBefore)
		if grew > 2<<20 {
			t.Errorf("heap grew by %d KiB over %d reloads", grew>>10, reloads)
		} else {
			t.Logf("heap grew by %d KiB over %d reloads", grew>>10, reloads)
		}
	})
}

// TestFlowLimit floods the listener with flows from many source addresses in
// 127.0.0.0/8 and ports, over max_flows: new flows over the cap are dropped
// and counted as flow_limit, the cap holds (the upstream sees at most
// max_flows sockets), descriptors stay bounded, and a client established
// before the flood keeps every round trip.
func TestFlowLimit(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		const maxFlows, addrs, ports = 50, 49, 3 // 147 flood flows
		a, lb, hd := startWithOne(t, network, per, map[string]any{"max_flows": maxFlows})
		good := newClient(t, lb.addr)
		good.mustRoundTrip("before-the-flood")
		baseFD := openFDs(t)

		to := net.UDPAddrFromAddrPort(mustAddrPort(t, lb.addr))
		var flood []*net.UDPConn
		for i := range addrs {
			for range ports {
				conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, byte(2+i))})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = conn.Close() })
				flood = append(flood, conn)
			}
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			for round := range 3 {
				for i, conn := range flood {
					_, _ = conn.WriteTo([]byte(fmt.Sprintf("flood-%d-%d", i, round)), to)
				}
				time.Sleep(50 * time.Millisecond)
			}
		}()
		for i := range 100 {
			if _, _, err := good.roundTrip([]byte(fmt.Sprintf("good-%d", i)), time.Second); err != nil {
				t.Errorf("the established client's round trip %d during the flood: %v", i, err)
			}
		}
		<-done
		time.Sleep(200 * time.Millisecond)

		if n := sourcesOf(a); n > maxFlows {
			t.Errorf("the upstream saw %d balancer sockets, over max_flows %d", n, maxFlows)
		}
		if d := hd.Drops()["flow_limit"]; d == 0 {
			t.Errorf("no datagram counted as flow_limit after %d flows over max_flows %d", len(flood)+1, maxFlows)
		}
		if fds := openFDs(t); fds > baseFD+len(flood)+maxFlows+20 {
			t.Errorf("%d descriptors open, %d before the flood of %d client sockets (max_flows %d)", fds, baseFD, len(flood), maxFlows)
		}
	})
}

// TestFlowLimitPerIP: with max_flows_per_ip, flows from one address beyond
// the cap are dropped and counted as flow_limit; other addresses and flows
// established before are unaffected.
func TestFlowLimitPerIP(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		const perIP, flows = 3, 10
		a, lb, hd := startWithOne(t, network, per, map[string]any{"max_flows_per_ip": perIP})
		good := newClient(t, lb.addr)
		good.mustRoundTrip("before")

		to := net.UDPAddrFromAddrPort(mustAddrPort(t, lb.addr))
		for i := range flows {
			conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = conn.Close() })
			for j := range 2 {
				if _, err := conn.WriteTo([]byte(fmt.Sprintf("same-ip-%d-%d", i, j)), to); err != nil {
					t.Fatal(err)
				}
			}
		}
		eventually(t, 2*time.Second, "the flows over the cap counted", func() bool {
			return hd.Drops()["flow_limit"] >= 2*(flows-perIP)
		})
		if n := sourcesOf(a); n > perIP+1 {
			t.Errorf("the upstream saw %d balancer sockets for 1 + %d flows from one address, cap %d", n, flows, perIP)
		}
		newClientFrom(t, net.IPv4(127, 0, 0, 3), lb.addr).mustRoundTrip("another-address")
		good.mustRoundTrip("after")
	})
}

// waitUntil polls cond like eventually, and reports whether it held in time.
func waitUntil(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// newClientFrom is newClient with the client's socket bound to ip.
func newClientFrom(t testing.TB, ip net.IP, to string) *client {
	t.Helper()
	conn, err := net.DialUDP("udp", &net.UDPAddr{IP: ip}, net.UDPAddrFromAddrPort(mustAddrPort(t, to)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &client{t: t, conn: conn, buf: make([]byte, 65535)}
}

func mustAddrPort(t testing.TB, s string) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// collectGarbage runs the collector until weak pointers to unreachable
// objects are cleared and their cleanups have run.
func collectGarbage() {
	for range 3 {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
}

func heapAlloc() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// adminReplace replaces the config at url with v through the admin API,
// retrying when the connection fails: each change restarts Caddy's admin
// server, whose old listener may drop a new connection. A replacement is
// idempotent, so a retry is safe.
func adminReplace(t *testing.T, url string, v any) {
	t.Helper()
	body, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	for try := 0; ; try++ {
		req, err := http.NewRequest(http.MethodPatch, url, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := adminClient.Do(req)
		if err != nil {
			if try < 5 {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			t.Fatalf("PATCH %s: %v", url, err)
		}
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("PATCH %s: %s: %s", url, resp.Status, msg)
		}
		return
	}
}
