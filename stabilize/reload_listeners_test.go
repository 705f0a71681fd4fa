package stabilize

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// listenersConfig is a Caddy config with one layer4 server per address
// in addrs, on network, each with a one-second idle timeout and routing
// to handler, with the admin API at admin.
func listenersConfig(network, admin string, handler any, addrs ...string) []byte {
	servers := map[string]any{}
	for i, a := range addrs {
		servers[fmt.Sprint("s", i)] = map[string]any{
			"listen":       []string{network + "/" + a},
			"idle_timeout": "1s",
			"routes":       []any{map[string]any{"handle": []any{handler}}},
		}
	}
	cfg := map[string]any{
		"admin":   map[string]any{"listen": admin},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "WARN"}}},
		"apps":    map[string]any{"layer4": map[string]any{"servers": servers}},
	}
	out, err := json.Marshal(cfg)
	if err != nil {
		panic(err)
	}
	return out
}

// setListeners is the listeners of the set's tables.
func setListeners(s *cidTableSet) map[netip.AddrPort]bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[netip.AddrPort]bool)
	for l := range s.tables {
		m[l] = true
	}
	return m
}

// janitors counts the goroutines running a cidTableSet's janitor.
func janitors() int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "(*cidTableSet).janitor")
}

// TestConnectionTablesListenerSetReload: a reload that removes a listener
// leaves that listener's table until its entries expire, then drops it;
// the remaining listener keeps its table; after caddy.Stop the identity's
// set is gone from the pool and its janitor has ended.
func TestConnectionTablesListenerSetReload(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		before := janitors()
		tr := trackHandlers(t)
		var list []any
		for i := range 2 {
			s := startInitialServer(t, byte(i))
			list = append(list, map[string]any{"dial": "udp/" + s.conn.LocalAddr().String()})
		}
		handler := map[string]any{
			"handler": "stabilize", "upstreams": list, "per": PerConnection,
			"load_balancing": map[string]any{"selection": map[string]any{"policy": "round_robin"}},
		}
		a, b, c := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t)), fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t)), fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		admin := fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t))
		if err := caddy.Load(listenersConfig(network, admin, handler, a, b), true); err != nil {
			t.Fatal(err)
		}
		stopped := false
		t.Cleanup(func() {
			if !stopped {
				_ = caddy.Stop()
			}
		})
		for i, l := range []string{a, b} {
			exchangeLongHeader(t, newClient(t, l), 0, []byte{0xf1, byte(i), 2, 3, 4, 5, 6, 7}, []byte{0x5a, byte(i), 0, 0})
		}
		h := tr.latest()
		identity := h.identity
		set := h.router.(*perConnectionRouter).tables
		la, lb, lc := netip.MustParseAddrPort(a), netip.MustParseAddrPort(b), netip.MustParseAddrPort(c)
		if got := setListeners(set); !got[la] || !got[lb] {
			t.Fatalf("tables of %v, want %v and %v", got, la, lb)
		}

		// B removed, C added.
		if err := caddy.Load(listenersConfig(network, admin, handler, a, c), true); err != nil {
			t.Fatal(err)
		}
		if h2 := tr.latest(); h2.router.(*perConnectionRouter).tables != set {
			t.Fatal("the reload replaced the identity's set")
		}
		exchangeLongHeader(t, newClient(t, c), 0, []byte{0xf2, 1, 2, 3, 4, 5, 6, 7}, []byte{0x5c, 0, 0, 0})
		eventually(t, 5*time.Second, "the removed listener's table dropped once its entries expired", func() bool {
			got := setListeners(set)
			return !got[lb] && got[lc]
		})

		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
		stopped = true
		if n, ok := cidTables.References(identity); ok {
			t.Errorf("after caddy.Stop the set of %q has %d references", identity, n)
		}
		eventually(t, 3*time.Second, "the set's janitor ended", func() bool { return janitors() <= before })
	})
}

// TestReloadListenerReassigned: a reload gives listener L another handler
// (a new identity, other upstreams) and moves L's old handler's identity
// to a new listener M. A client's flow on L that was open before the
// reload must follow L's new route; it must not go on through the handler
// of M, which the new config never routes L to.
//
// It fails on fastudp/ (review15c.md, pre-existing in reload.go: leave
// picks a successor by identity and upstreams, never by listener), so it
// runs only with STABILIZE_KNOWN_DEFECTS=1 until that is fixed.
func TestReloadListenerReassigned(t *testing.T) {
	if os.Getenv("STABILIZE_KNOWN_DEFECTS") == "" {
		t.Skip("known defect (review15c.md); STABILIZE_KNOWN_DEFECTS=1 runs it")
	}
	forNetworks(t, func(t *testing.T, network string) {
		x, y := startUpstream(t, "x"), startUpstream(t, "y")
		l, m := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t)), fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		server := func(addr string, handler any) map[string]any {
			return map[string]any{
				"listen":       []string{network + "/" + addr},
				"idle_timeout": "30s",
				"routes":       []any{map[string]any{"handle": []any{handler}}},
			}
		}
		load := func(servers map[string]any) {
			t.Helper()
			cfg, err := json.Marshal(map[string]any{
				"admin":   map[string]any{"disabled": true},
				"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "WARN"}}},
				"apps":    map[string]any{"layer4": map[string]any{"servers": servers}},
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := caddy.Load(cfg, true); err != nil {
				t.Fatal(err)
			}
		}
		load(map[string]any{"a": server(l, handlerConfig(PerFlow, "", x))})
		t.Cleanup(func() { _ = caddy.Stop() })
		c := newClient(t, l)
		if got := c.mustRoundTrip("before"); got != "x" {
			t.Fatalf("before the reload: reached %q, want x", got)
		}
		load(map[string]any{
			"a": server(l, handlerConfig(PerPacket, "", y)),
			"b": server(m, handlerConfig(PerFlow, "", x)),
		})
		if got := c.mustRoundTrip("after"); got != "y" {
			t.Errorf("after the reload: the flow on %s reached %q through the handler of %s, want y, its listener's new route", l, got, m)
		}
	})
}
