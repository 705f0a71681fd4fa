package stabilize

import (
	"bytes"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func TestFastNetworkRoundRobin(t *testing.T) {
	t.Run("packet", func(t *testing.T) {
		a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
		lb := startBalancerOn(t, FastNetwork, false, 30*time.Second, handlerConfig("packet", "", a, b, c))
		cl := newClient(t, lb.addr)
		for i := range 30 {
			if got, want := cl.mustRoundTrip(fmt.Sprint(i)), []string{"a", "b", "c"}[i%3]; got != want {
				t.Fatalf("datagram %d went to %s, want %s", i, got, want)
			}
		}
	})
	t.Run("flow", func(t *testing.T) {
		a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
		lb := startBalancerOn(t, FastNetwork, false, 30*time.Second, handlerConfig("flow", "", a, b, c))
		if got := counts(flowsTo(t, lb.addr, 30, 5)); got != "map[a:10 b:10 c:10]" {
			t.Fatalf("30 flows spread %s, want 10/10/10", got)
		}
	})
}

func TestFastNetworkSizes(t *testing.T) {
	a := startUpstream(t, "a")
	lb := startBalancerOn(t, FastNetwork, false, 30*time.Second, handlerConfig("", "", a))
	cl := newClient(t, lb.addr)
	for _, size := range []int{1, 0, 8000, 8998} {
		payload := bytes.Repeat([]byte("z"), size)
		if _, echo, err := cl.roundTrip(payload, 2*time.Second); err != nil || !bytes.Equal(echo, payload) {
			t.Fatalf("%d bytes: echo of %d bytes, %v", size, len(echo), err)
		}
	}
	if _, _, err := cl.roundTrip(make([]byte, 12000), 300*time.Millisecond); !isTimeout(err) {
		t.Fatalf("a 12000-byte datagram was not dropped: %v", err)
	}
	cl.mustRoundTrip("still-serving")

	// A 9000-byte datagram fits exactly, even as a new flow's first.
	if _, err := newClient(t, lb.addr).conn.Write(make([]byte, 9000)); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "the upstream to receive 9000 bytes", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.last) == 9000
	})

	// A new flow's first datagram, cut short, is counted by the socket.
	fresh := newClient(t, lb.addr)
	if _, err := fresh.conn.Write(make([]byte, 12000)); err != nil {
		t.Fatal(err)
	}
	s := fastSocketAt(t, lb.addr)
	eventually(t, 2*time.Second, "the socket to count the truncated datagram", func() bool {
		_, truncated := s.Drops()
		return truncated == 1
	})
}

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

func TestFastNetworkReloadKeepsSocket(t *testing.T) {
	a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
	lb := startBalancerOn(t, FastNetwork, true, 30*time.Second, handlerConfig("flow", "", a, b))
	upstreams := "http://" + lb.admin + "/config/apps/layer4/servers/srv0/routes/0/handle/0/upstreams"

	cls := []*client{newClient(t, lb.addr), newClient(t, lb.addr)}
	names := []string{cls[0].mustRoundTrip("x"), cls[1].mustRoundTrip("y")}
	baseG := runtime.NumGoroutine()
	for i := range 6 {
		if i%2 == 0 {
			adminDo(t, http.MethodPost, upstreams, fmt.Sprintf(`{"dial": %q}`, c.dial()))
		} else {
			adminDo(t, http.MethodDelete, upstreams+"/2", "")
		}
		for j, cl := range cls {
			var got string
			eventually(t, 3*time.Second, "a reply after the reload", func() bool {
				n, _, err := cl.roundTrip([]byte(fmt.Sprint(i, j)), 200*time.Millisecond)
				got = n
				return err == nil
			})
			if got != names[j] {
				t.Fatalf("reload %d: flow %d moved from %s to %s", i, j, names[j], got)
			}
		}
	}
	if g := runtime.NumGoroutine(); g > baseG+20 {
		t.Errorf("goroutines grew from %d to %d over 6 reloads", baseG, g)
	}
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

	cl := newClient(t, lb.addr)
	for i := range 35 { // 3.5 s of traffic
		cl.mustRoundTrip(fmt.Sprint(i))
		time.Sleep(100 * time.Millisecond)
	}
	if n := handleCalls(); n != 0 {
		t.Fatalf("%d Handle calls still running for an established fast flow", n)
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

// On a wildcard fastudp listener (dual-stack), IPv4 and IPv6 clients both
// get their replies through the batched sends.
func TestFastNetworkDualStack(t *testing.T) {
	a := startUpstream(t, "a")
	port := freeUDPPort(t)
	if err := caddy.Load(testConfigOn(FastNetwork, fmt.Sprintf(":%d", port), "", 30*time.Second, handlerConfig("flow", "", a)), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	for _, to := range []string{fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("[::1]:%d", port)} {
		cl := newClient(t, to)
		for i := range 3 {
			cl.mustRoundTrip(fmt.Sprint(to, i))
		}
	}
}
