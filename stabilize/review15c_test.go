package stabilize

import (
	"encoding/json"
	"fmt"
	"net/netip"
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
