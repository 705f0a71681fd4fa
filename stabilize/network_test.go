package stabilize

import (
	"encoding/json"
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// A flow whose datagrams bypass caddy-l4 outlives caddy-l4's idle timeout
// while active, keeping its upstream socket, and ends once idle.
func TestFastNetworkFlowOutlivesListenerIdleTimeout(t *testing.T) {
	a, b := startUpstream(t, "a"), startUpstream(t, "b")
	lb := startBalancerOn(t, FastNetwork, false, time.Second, handlerConfig("flow", "", a, b))
	baseG := ourGoroutines()

	cl := newClient(t, lb.addr)
	first := cl.mustRoundTrip("first")
	for i := range 30 { // 3 s, three idle timeouts
		if got := cl.mustRoundTrip(fmt.Sprint(i)); got != first {
			t.Fatalf("flow moved from %s to %s", first, got)
		}
		time.Sleep(100 * time.Millisecond)
	}
	up := map[string]*testUpstream{"a": a, "b": b}[first]
	up.mu.Lock()
	sources := len(up.sources)
	up.mu.Unlock()
	if sources != 1 {
		t.Fatalf("the upstream saw %d source ports, want the flow's one socket", sources)
	}
	eventually(t, 5*time.Second, "the idle flow to end", func() bool { return ourGoroutines() <= baseG })
	cl.mustRoundTrip("a new flow")
}

// handleCalls counts goroutines inside Handler.Handle.
func handleCalls() int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "stabilize.(*Handler).Handle(")
}

// A fast flow's Handle returns soon after the flow is established; the
// socket keeps the flow until it has been idle for the server's
// idle_timeout.
func TestFastNetworkHandsFlowsToTheSocket(t *testing.T) {
	a := startUpstream(t, "a")
	lb := startBalancerOn(t, FastNetwork, false, 4*time.Second, handlerConfig("flow", "", a))
	live := fastSocketAt(t, lb.addr).Endpoints

	// Handle calls of earlier tests' flows may still be draining; they
	// only end.
	before := handleCalls()
	cl := newClient(t, lb.addr)
	for i := range 35 { // 3.5 s of traffic
		cl.mustRoundTrip(fmt.Sprint(i))
		time.Sleep(100 * time.Millisecond)
	}
	if n := handleCalls(); n > before {
		t.Fatalf("%d Handle calls running, %d before: one is still running for an established fast flow", n, before)
	}
	if live() != 1 {
		t.Fatalf("the socket has %d flows, want the one live flow", live())
	}
	a.mu.Lock()
	sources := len(a.sources)
	a.mu.Unlock()
	if sources != 1 {
		t.Fatalf("the upstream saw %d source ports, want the flow's one socket", sources)
	}
	time.Sleep(2 * time.Second)
	if live() != 1 {
		t.Fatal("the flow ended before the 4s idle timeout")
	}
	eventually(t, 5*time.Second, "the idle flow to end", func() bool { return live() == 0 })
}

// On a wildcard listener (dual-stack), IPv4 and IPv6 clients both get their
// replies; on fastudp/, through the batched sends.
func TestDualStackListener(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a := startUpstream(t, "a")
		port := freeUDPPort(t)
		if err := caddy.Load(testConfigOn(network, fmt.Sprintf(":%d", port), "", 30*time.Second, handlerConfig(per, "", a)), true); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = caddy.Stop() })
		for _, to := range []string{fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("[::1]:%d", port)} {
			cl := newClient(t, to)
			for i := range 3 {
				cl.mustRoundTrip(fmt.Sprint(to, i))
			}
		}
	})
}

// A config that resizes a fastudp socket's readers (fastudp_readers) and
// then fails to start leaves the socket as the running config had it: its
// front closes, the readers go back to the running config's count, and
// the socket closes once that config stops.
func TestFastReadersRollBackAfterFailedStart(t *testing.T) {
	if !udpio.HasReusePort {
		t.Skip("one reader without SO_REUSEPORT")
	}
	a := startUpstream(t, "a")
	addr := localAddr(freeUDPPort(t))
	running := withStabilizeApp(t, testConfigOn(FastNetwork, addr, "", 30*time.Second, handlerConfig(PerFlow, "", a)),
		map[string]any{"fastudp_readers": 2})
	if err := caddy.Load(running, true); err != nil {
		t.Fatal(err)
	}
	cl := newClient(t, addr)
	cl.mustRoundTrip("before")

	busy, err := net.Listen("tcp", "127.0.0.1:0") // the failing config's second address
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	var doc map[string]any
	if err := json.Unmarshal(testConfigOn(FastNetwork, addr, "", 30*time.Second, handlerConfig(PerFlow, "", a)), &doc); err != nil {
		t.Fatal(err)
	}
	srv := doc["apps"].(map[string]any)["layer4"].(map[string]any)["servers"].(map[string]any)["srv0"].(map[string]any)
	srv["listen"] = []string{FastNetwork + "/" + addr, "tcp/" + busy.Addr().String()}
	failing, _ := json.Marshal(doc)
	if err := caddy.Load(withStabilizeApp(t, failing, map[string]any{"fastudp_readers": 4}), true); err == nil {
		t.Fatal("a config listening on a busy address started")
	}
	s := fastSocketAt(t, addr)
	eventually(t, 2*time.Second, "the readers back at the running config's 2", func() bool { return s.Readers() == 2 })
	cl.mustRoundTrip("after the failed start")

	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "the socket to close with the running config", func() bool { return !s.Open() })
}
