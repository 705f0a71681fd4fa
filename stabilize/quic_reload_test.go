package stabilize

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/quic-go/quic-go"
)

// TestQUICReloadReleasesRemovedListener: a reload that moves the
// terminating handler to another listener releases the transport of the
// listener it no longer has: that transport's connections end, and their
// backend connections with them, rather than living on in a handler that
// does not listen there.
func TestQUICReloadReleasesRemovedListener(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, lb, c := startQUICRelay(t, network)
		mustExchange(t, c, []byte("before"))
		moved := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		if err := caddy.Load(testConfigOn(network, moved, "", 30*time.Second, quicHandler(t, "", "", nil, a.dial())), true); err != nil {
			t.Fatal(err)
		}
		c2 := dialQUIC(t, moved, nil, quicClientTLS(t))
		if got := mustExchange(t, c2, []byte("moved")); got != "a" {
			t.Fatalf("reply from %q through the new listener", got)
		}
		eventually(t, 5*time.Second, "the removed listener's connection to end at the backend", func() bool {
			return a.live.Load() == 1
		})
		if refs, ok := quicTransports.References(network + "/" + lb.addr); ok {
			t.Fatalf("the removed listener's transport has %d references", refs)
		}
	})
}

// TestQUICReloadTurnsOnTermination: a reload that adds QUIC termination to
// a handler of the same granularity, policy and upstreams does not hand it
// the old handler's flows, which would go on being balanced raw; a
// client's next datagram goes to the new handler's QUIC transport, and
// QUIC clients are served.
func TestQUICReloadTurnsOnTermination(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		raw := startUpstream(t, "raw")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(PerFlow, "round_robin", raw))
		cl := newClient(t, lb.addr)
		cl.mustRoundTrip("before")
		if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, PerFlow, "round_robin", nil, raw.dial())), true); err != nil {
			t.Fatal(err)
		}
		if name, _, err := cl.roundTrip([]byte("after"), 500*time.Millisecond); err == nil {
			t.Fatalf("a raw datagram after the reload was balanced to %q", name)
		}
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		if got := mustExchange(t, c, []byte("quic")); got != "raw" {
			t.Fatalf("reply from %q", got)
		}
	})
}

// TestQUICReloadEndsHandleAtOnce: a reload wakes every Handle of the old
// terminating handler, and the fastudp hand-off deadline that a Handle
// sets as it begins, or after each datagram, does not override the wake:
// none of them waits on for the hand-off's two seconds. Under a flood of
// new clients some Handle calls are still setting up when the reload wakes
// them (their registration with the socket waits behind others'), so the
// test follows each one that waits for a datagram after the wake.
func TestQUICReloadEndsHandleAtOnce(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		a := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, a.dial()))
		defer newClientsFlood(t, lb.addr, 2)() // a Handle starts for each
		var stacks []byte
		for i := range 3 {
			time.Sleep(300 * time.Millisecond)
			old := tr.latest()
			if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, "", "", nil, a.dial())), true); err != nil {
				t.Fatal(err)
			}
			reading := func() int {
				old.quicHeld.mu.Lock()
				defer old.quicHeld.mu.Unlock()
				return len(old.quicHeld.flows)
			}
			waiting := make(map[string]time.Time) // since when each Handle waits
			// Generous: under the race detector on a busy machine, a flood's
			// Handle calls can take seconds to start; what is checked is
			// that none of them waits on after the wake (below).
			for deadline := time.Now().Add(20 * time.Second); reading() > 0; {
				now := time.Now()
				if now.After(deadline) {
					t.Fatalf("reload %d: %d flows still read by the old handler; where its Handle calls are:\n%s",
						i+1, reading(), quicHandleStacks(old, &stacks))
				}
				for _, id := range quicHandlesWaiting(old, &stacks) {
					since, ok := waiting[id]
					if !ok {
						waiting[id] = now
					} else if now.Sub(since) > fastHandoff/2 {
						t.Fatalf("reload %d: a Handle of the old handler waits for a datagram %v after the wake",
							i+1, now.Sub(since).Round(time.Millisecond))
					}
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	})
}

// quicHandleStacks returns the stacks of h's handleQUIC calls, for a
// failure message: the first of each kind, with how many share it.
func quicHandleStacks(h *Handler, buf *[]byte) string {
	recv := fmt.Sprintf("handleQUIC(%p,", h)
	kinds := make(map[string]int)
	var order []string
	for _, g := range goroutineStacks(buf) {
		if !strings.Contains(g, recv) {
			continue
		}
		_, stack, _ := strings.Cut(g, "\n") // without the goroutine's ID
		stack = hexArgs.ReplaceAllString(stack, "0x…")
		if kinds[stack]++; kinds[stack] == 1 {
			order = append(order, stack)
		}
	}
	var b strings.Builder
	for _, stack := range order {
		fmt.Fprintf(&b, "%d Handle calls at:\n%s\n", kinds[stack], stack)
	}
	return b.String()
}

// hexArgs are the arguments and offsets in a stack, which differ from one
// goroutine to the next.
var hexArgs = regexp.MustCompile(`0x[0-9a-f]+`)

// quicHandlesWaiting returns the goroutine IDs of h's handleQUIC calls that
// wait in caddy-l4's read for a datagram.
func quicHandlesWaiting(h *Handler, buf *[]byte) []string {
	recv := fmt.Sprintf("handleQUIC(%p,", h)
	var ids []string
	for _, g := range goroutineStacks(buf) {
		if strings.Contains(g, recv) && strings.Contains(g, "layer4.(*packetConn).Read(") {
			id, _, _ := strings.Cut(strings.TrimPrefix(g, "goroutine "), " ")
			ids = append(ids, id)
		}
	}
	return ids
}

// goroutineStacks returns the stack of every goroutine. It reads them into
// *buf, kept from call to call, which starts at 1 MiB and grows only when
// full.
func goroutineStacks(buf *[]byte) []string {
	if *buf == nil {
		*buf = make([]byte, 1<<20)
	}
	n := runtime.Stack(*buf, true)
	for n == len(*buf) {
		*buf = make([]byte, 2*len(*buf))
		n = runtime.Stack(*buf, true)
	}
	return strings.Split(string((*buf)[:n]), "\n\n")
}

// TestQUICReloadTwoListeners: with two listeners, each terminating QUIC in
// a handler of its own, a reload gives each listener's transport to the
// new handler of that listener: new connections on A, from a client the
// listener already knows (on fastudp/ its datagrams bypass caddy-l4) or a
// new one, get A's upstreams and ALPN; connections opened before the
// reloads go on. "upstreams": the handlers differ in their upstreams;
// "alpn": they share them and differ in ALPN; "changed": each reload
// changes A's ALPN, so that only A's flows tell its new handler: on
// fastudp/ the known client's endpoint expires and its next datagram
// passes through caddy-l4, on udp/ the first datagram through the new
// listener socket does (the kernel may hash a client to the old one).
func TestQUICReloadTwoListeners(t *testing.T) {
	for _, tc := range []struct {
		name    string
		sameUps bool
		alpnA   []string // A's ALPN at the start, then after each reload (the last repeats)
		alpnB   string
	}{
		{name: "upstreams", alpnA: []string{testALPN}, alpnB: testALPN},
		{name: "alpn", sameUps: true, alpnA: []string{"proto-a"}, alpnB: "proto-b"},
		{name: "changed", sameUps: true, alpnA: []string{"proto-a", "proto-c", "proto-a"}, alpnB: "proto-b"},
		{name: "identical", sameUps: true, alpnA: []string{"proto-a", "proto-c", "proto-a"}, alpnB: "proto-a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forNetworks(t, func(t *testing.T, network string) {
				testQUICReloadTwoListeners(t, network, tc.sameUps, tc.alpnA, tc.alpnB)
			})
		})
	}
}

func testQUICReloadTwoListeners(t *testing.T, network string, sameUps bool, alpnsA []string, alpnB string) {
	all := []string{testALPN, "proto-a", "proto-b", "proto-c"}
	ba, bb := startQUICBackend(t, "a", all...), startQUICBackend(t, "b", all...)
	upsA, upsB := []string{ba.dial()}, []string{bb.dial()}
	if sameUps {
		upsA = []string{ba.dial(), bb.dial()}
		upsB = upsA
	}
	addrA := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
	addrB := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
	alpn := map[string]string{addrB: alpnB}
	load := func(alpnA string) {
		t.Helper()
		alpn[addrA] = alpnA
		handler := func(addr string, ups []string) any {
			return quicHandler(t, "", "first", map[string]any{"alpn": []string{alpn[addr]}}, ups...)
		}
		loadTwoListeners(t, network, addrA, handler(addrA, upsA), addrB, handler(addrB, upsB))
	}
	dial := func(tr *quic.Transport, addr string) (*quic.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)),
			quicClientTLS(t, alpn[addr]), &quic.Config{EnableDatagrams: true})
		if err == nil {
			t.Cleanup(func() { _ = c.CloseWithError(0, "") })
		}
		return c, err
	}
	load(alpnsA[0])
	t.Cleanup(func() { _ = caddy.Stop() })
	clients := map[string]*quic.Transport{}
	before := map[string]*quic.Conn{}
	for _, addr := range []string{addrA, addrB} {
		clients[addr] = newClientTransport(t)
		c, err := dial(clients[addr], addr)
		if err != nil {
			t.Fatalf("dialing %s: %v", addr, err)
		}
		mustExchange(t, c, []byte("before"))
		before[addr] = c
	}
	for reload := range 3 {
		load(alpnsA[min(reload+1, len(alpnsA)-1)])
		for _, addr := range []string{addrA, addrB} {
			for _, tr := range []*quic.Transport{clients[addr], newClientTransport(t)} {
				c, err := dial(tr, addr)
				if err != nil {
					t.Fatalf("reload %d: a new connection to %s (ALPN %s): %v", reload, addr, alpn[addr], err)
				}
				if got := c.ConnectionState().TLS.NegotiatedProtocol; got != alpn[addr] {
					t.Fatalf("reload %d: a new connection to %s negotiated %q, want %q", reload, addr, got, alpn[addr])
				}
				if !sameUps {
					want := map[string]string{addrA: "a", addrB: "b"}[addr]
					if got := mustExchange(t, c, []byte("after")); got != want {
						t.Fatalf("reload %d: a new connection to listener %s reached backend %s, want %s", reload, addr, got, want)
					}
				}
			}
			mustExchange(t, before[addr], []byte("still"))
		}
	}
}

// loadTwoListeners loads a config with two layer4 servers, at addrA with
// the handler hA and at addrB with hB.
func loadTwoListeners(t *testing.T, network, addrA string, hA any, addrB string, hB any) {
	t.Helper()
	server := func(addr string, h any) map[string]any {
		return map[string]any{
			"listen":       []string{network + "/" + addr},
			"idle_timeout": "30s",
			"routes":       []any{map[string]any{"handle": []any{h}}},
		}
	}
	cfg, err := json.Marshal(map[string]any{
		"admin":   map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{
			"srvA": server(addrA, hA), "srvB": server(addrB, hB),
		}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatal(err)
	}
}

// TestQUICReloadTerminationToPlain: listeners A and B both terminate QUIC;
// reloads turn A into plain balancing, B unchanged. Nothing claims A's
// transport, which is released once A's connections have idled out: no
// reference to it is left, its accept loop has returned, and every raw
// client of A is balanced; on fastudp/ at once after each reload, on udp/
// once the held duplicate of A's old socket has closed with the transport.
// B's connection goes on.
func TestQUICReloadTerminationToPlain(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		b := startQUICBackend(t, "b", "proto-a", "proto-b")
		raw := startUpstream(t, "raw")
		addrA := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		addrB := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		keyA := network + "/" + addrA
		qB := quicHandler(t, "", "", map[string]any{"alpn": []string{"proto-b"}}, b.dial())
		qA := quicHandler(t, "", "", map[string]any{"alpn": []string{"proto-a"}, "max_idle_timeout": "1s"}, b.dial())
		loadTwoListeners(t, network, addrA, qA, addrB, qB)
		t.Cleanup(func() { _ = caddy.Stop() })
		mustExchange(t, dialQUIC(t, addrA, nil, quicClientTLS(t, "proto-a")), []byte("a"))
		cB := dialQUIC(t, addrB, nil, quicClientTLS(t, "proto-b"))
		mustExchange(t, cB, []byte("b"))
		transportA := quicTransportOf(tr, keyA)
		if transportA == nil {
			t.Fatal("no handler holds A's transport")
		}
		rawClients := func(when string) {
			t.Helper()
			for i := range 16 {
				cl := newClient(t, addrA)
				if _, _, err := cl.roundTrip([]byte(fmt.Sprint("raw ", i)), 500*time.Millisecond); err != nil {
					t.Fatalf("%s: raw client %d of A unanswered: %v", when, i, err)
				}
			}
		}
		for reload := range 3 {
			loadTwoListeners(t, network, addrA, handlerConfig(PerFlow, "", raw), addrB, qB)
			if network == FastNetwork {
				rawClients(fmt.Sprint("reload ", reload))
			}
			mustExchange(t, cB, []byte("still"))
		}
		eventually(t, 5*time.Second, "A's transport to be released", func() bool {
			_, ok := quicTransports.References(keyA)
			return !ok
		})
		select {
		case <-transportA.done:
		case <-time.After(5 * time.Second):
			t.Fatal("A's transport's accept loop still runs")
		}
		rawClients("after the release")
		mustExchange(t, cB, []byte("still"))
	})
}

// TestQUICReloadKnownClientNewConnection: listeners A and B terminate QUIC
// with the same upstreams; each reload changes A's ALPN. A client that A's
// transport already knows (on fastudp/ its datagrams bypass caddy-l4) opens
// a new connection right after each reload: it is served by A's new
// handler, never by B's or a guess.
func TestQUICReloadKnownClientNewConnection(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		all := []string{"proto-a", "proto-b", "proto-c"}
		ba, bb := startQUICBackend(t, "a", all...), startQUICBackend(t, "b", all...)
		ups := []string{ba.dial(), bb.dial()}
		addrA := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		addrB := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		handler := func(alpn string) any {
			return quicHandler(t, "", "first", map[string]any{"alpn": []string{alpn}}, ups...)
		}
		load := func(alpnA string) { loadTwoListeners(t, network, addrA, handler(alpnA), addrB, handler("proto-b")) }
		load("proto-a")
		t.Cleanup(func() { _ = caddy.Stop() })
		tr := newClientTransport(t)
		dial := func(alpn string) error {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			c, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addrA)), quicClientTLS(t, alpn), &quic.Config{})
			if err == nil {
				_ = c.CloseWithError(0, "")
			}
			return err
		}
		if err := dial("proto-a"); err != nil {
			t.Fatal(err)
		}
		for i := range 6 {
			alpn := []string{"proto-c", "proto-a"}[i%2]
			load(alpn)
			if err := dial(alpn); err != nil {
				t.Fatalf("reload %d: a new connection of a known client with A's new ALPN %s: %v", i, alpn, err)
			}
		}
	})
}

// quicTransportOf returns the transport at key that a tracked handler
// holds, or nil.
func quicTransportOf(tr *handlerTracker, key string) *quicTransport {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, w := range tr.hs {
		if h := w.Value(); h != nil {
			h.quicHeld.mu.Lock()
			qt := h.quicHeld.m[key]
			h.quicHeld.mu.Unlock()
			if qt != nil {
				return qt
			}
		}
	}
	return nil
}

// TestQUICParkedReleasedWhenListenerRemoved: a transport parked by a
// reload (A's handler changed, no traffic on A to claim it) is released
// soon after a later reload removes A's listener, and after Caddy stops,
// not at the parked handler's idle timeout (30 s).
func TestQUICParkedReleasedWhenListenerRemoved(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "b", "proto-a", "proto-b", "proto-c")
		addrA := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		addrB := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		keyA, keyB := network+"/"+addrA, network+"/"+addrB
		h := func(alpn string) any {
			return quicHandler(t, "", "", map[string]any{"alpn": []string{alpn}}, b.dial())
		}
		loadTwoListeners(t, network, addrA, h("proto-a"), addrB, h("proto-b"))
		t.Cleanup(func() { _ = caddy.Stop() })
		mustExchange(t, dialQUIC(t, addrA, nil, quicClientTLS(t, "proto-a")), []byte("a"))
		mustExchange(t, dialQUIC(t, addrB, nil, quicClientTLS(t, "proto-b")), []byte("b"))
		loadTwoListeners(t, network, addrA, h("proto-c"), addrB, h("proto-b")) // A parked
		if _, ok := quicTransports.References(keyA); !ok {
			t.Fatal("A's transport released by the reload that keeps A")
		}
		if err := caddy.Load(testConfigOn(network, addrB, "", 30*time.Second, h("proto-b")), true); err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, "the release of removed A's parked transport", func() bool {
			_, ok := quicTransports.References(keyA)
			return !ok
		})
		mustExchange(t, dialQUIC(t, addrB, nil, quicClientTLS(t, "proto-b")), []byte("b"))
		// B parked by Stop, if no handler held it: released as well.
		_ = caddy.Stop()
		eventually(t, 5*time.Second, "the release of B's transport after Stop", func() bool {
			_, ok := quicTransports.References(keyB)
			return !ok
		})
	})
}

// TestQUICReloadFailedStartReclaims: a handler of a newer config claims
// the transport, then its config fails to start and it is cleaned up,
// parking the transport (simulated: which app starts first is up to
// Caddy). The running config's handler, whose flows go on, claims it back
// at its flows' next datagram: a known client's new connection does not
// wait for a new client to come.
func TestQUICReloadFailedStartReclaims(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		b := startQUICBackend(t, "b", "proto-a", "proto-b")
		addrA := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		addrB := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		keyA := network + "/" + addrA
		h := func(alpn string) any {
			return quicHandler(t, "", "", map[string]any{"alpn": []string{alpn}}, b.dial())
		}
		loadTwoListeners(t, network, addrA, h("proto-a"), addrB, h("proto-b"))
		t.Cleanup(func() { _ = caddy.Stop() })
		ctr := newClientTransport(t) // the known client: one socket
		dial := func(ctr *quic.Transport) error {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			c, err := ctr.Dial(ctx, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addrA)), quicClientTLS(t, "proto-a"), &quic.Config{})
			if err == nil {
				_ = c.CloseWithError(0, "")
			}
			return err
		}
		if err := dial(ctr); err != nil {
			t.Fatal(err)
		}
		qt := quicTransportOf(tr, keyA)
		failed := &Handler{QUIC: qt.cur.Load().QUIC}
		failed.quicHeld.seq = quicSeq.Add(1) // newer than the running config's
		failed.closing.Store(true)
		if _, _, err := quicTransports.LoadOrNew(keyA, func() (caddy.Destructor, error) { return nil, errors.New("released") }); err != nil {
			t.Fatal(err)
		}
		qt.claim(failed)
		if !qt.park(failed, time.Minute) {
			t.Fatal("not parked")
		}
		if err := dial(ctr); err != nil {
			t.Fatalf("the known client's new connection while the failed config's claim is parked: %v", err)
		}
		if qt.conn.unclaimed.Load() {
			t.Fatal("still unclaimed")
		}
	})
}
