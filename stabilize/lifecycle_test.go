package stabilize

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// On a listener written as udp4/ (or udp6/), the server's idle timeout still
// tells an empty datagram from the end of a flow: once caddy-l4 ends the
// flow, Handle reads no further, so nothing more reaches the upstream.
func TestIdleFlowEndsOnUDP4Listener(t *testing.T) {
	for _, per := range granularities {
		t.Run(per, func(t *testing.T) {
			up := startRawUpstream(t, true, false)
			lb := startBalancerOn(t, "udp4", false, 300*time.Millisecond, rawHandler(per, up))
			cl := newClient(t, lb.addr)
			if _, err := cl.conn.Write([]byte("once")); err != nil {
				t.Fatal(err)
			}
			eventually(t, 2*time.Second, "the datagram upstream", func() bool { return up.got.Load() == 1 })
			time.Sleep(time.Second) // past the idle timeout
			if n := up.got.Load(); n != 1 {
				t.Fatalf("the upstream got %d datagrams after the flow went idle, want the 1 sent", n)
			}
		})
	}
}

// A fastudp flow is not handed to a successor that listens elsewhere: the
// old socket closes with its config, and the flow ends with it instead of
// living on, unreachable, in the new handler.
func TestFastFlowsEndWithTheirSocket(t *testing.T) {
	tr := trackHandlers(t)
	a := startUpstream(t, "a")
	oldAddr, newAddr := localAddr(freeUDPPort(t)), localAddr(freeUDPPort(t))
	if err := caddy.Load(multiServerConfig(FastNetwork, "", time.Minute, serverSpec{oldAddr, handlerConfig("flow", "", a)}), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	newClient(t, oldAddr).mustRoundTrip("on-the-old-socket")
	if err := caddy.Load(multiServerConfig(FastNetwork, "", time.Minute, serverSpec{newAddr, handlerConfig("flow", "", a)}), true); err != nil {
		t.Fatal(err)
	}
	h := tr.latest()
	eventually(t, 2*time.Second, "the old socket's flow to end", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		return len(h.flows) == 0 && h.Upstreams[0].host.Flows() == 0
	})
	newClient(t, newAddr).mustRoundTrip("on-the-new-socket")
}

// A handler's identity names its policy, so handlers of different policies
// share no affinity table and never inherit each other's flows.
func TestIdentityNamesThePolicy(t *testing.T) {
	tr := trackHandlers(t)
	a, b := startUpstream(t, "a"), startUpstream(t, "b")
	if err := caddy.Load(multiServerConfig("udp", "", time.Minute,
		serverSpec{localAddr(freeUDPPort(t)), handlerConfig("flow", "round_robin", a, b)},
		serverSpec{localAddr(freeUDPPort(t)), handlerConfig("flow", "maglev", a, b)}), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	tr.mu.Lock()
	var hs []*Handler
	for _, w := range tr.hs {
		hs = append(hs, w.Value())
	}
	tr.mu.Unlock()
	if len(hs) != 2 || hs[0] == nil || hs[1] == nil {
		t.Fatalf("%d handlers provisioned, want 2 live ones", len(hs))
	}
	if hs[0].identity == hs[1].identity || hs[0].affinity == hs[1].affinity {
		t.Fatalf("round_robin and maglev handlers share identity %q", hs[0].identity)
	}
}

// A flow that a reload moves to the next config's handler ends after that
// config's idle timeout, not the one of the config it started in.
func TestReloadShorterIdleTimeoutEndsMovedFlows(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		a := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, time.Minute, handlerConfig("flow", "", a))
		cl := newClient(t, lb.addr)
		cl.mustRoundTrip("before")
		const idle = time.Second
		if err := caddy.Load(testConfigOn(network, lb.addr, "", idle, handlerConfig("flow", "", a)), true); err != nil {
			t.Fatalf("reload: %v", err)
		}
		cl.mustRoundTrip("after the reload")
		h := tr.latest()
		eventually(t, idle+fastHandoff+2*time.Second, "the flow to end after the new idle timeout", func() bool {
			h.mu.Lock()
			defer h.mu.Unlock()
			return len(h.flows) == 0 && h.Upstreams[0].host.Flows() == 0
		})
	})
}
