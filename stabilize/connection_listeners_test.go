package stabilize

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// twoListenerConfig is a Caddy config with two layer4 servers, "a" and
// "b", on network at the addresses a and b, each routing to handler, with
// the admin API at admin.
func twoListenerConfig(network, a, b, admin string, handler any) []byte {
	server := func(addr string) map[string]any {
		return map[string]any{
			"listen":       []string{network + "/" + addr},
			"idle_timeout": "30s",
			"routes":       []any{map[string]any{"handle": []any{handler}}},
		}
	}
	cfg := map[string]any{
		"admin":   map[string]any{"listen": admin},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "WARN"}}},
		"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{
			"a": server(a), "b": server(b),
		}}},
	}
	out, err := json.Marshal(cfg)
	if err != nil {
		panic(err)
	}
	return out
}

// TestConnectionTablePerListener: two listeners, each with a `per
// connection` handler of the same identity. A flood of new connections on
// listener A fills its connection-ID table; a connection then opened on
// listener B still has its server's connection ID learned, so its 1-RTT
// packets from new client addresses (NAT rebindings) reach its server, and
// still do after a reload of B's handler.
func TestConnectionTablePerListener(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		was := maxConnectionIDs
		maxConnectionIDs = 1500
		t.Cleanup(func() { maxConnectionIDs = was }) // after Caddy stops
		var list []any
		for i := range 3 {
			s := startInitialServer(t, byte(i))
			list = append(list, map[string]any{"dial": "udp/" + s.conn.LocalAddr().String()})
		}
		handler := map[string]any{
			"handler": "stabilize", "upstreams": list, "per": PerConnection,
			"load_balancing": map[string]any{"selection": map[string]any{"policy": "round_robin"}},
		}
		la, lb := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t)), fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
		admin := fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t))
		if err := caddy.Load(twoListenerConfig(network, la, lb, admin, handler), true); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = caddy.Stop() })

		// The flood: new connections from one client of A, each teaching
		// the balancer its DCID, its client connection and its server's
		// connection ID.
		flood := newClient(t, la)
		for i := range maxConnectionIDs/3 + 10 {
			exchangeLongHeader(t, flood, 0, []byte{0xf1, byte(i >> 8), byte(i), 3, 4, 5, 6, 7}, []byte{0x5a, byte(i >> 8), byte(i), 0})
		}
		m := scrape(t, admin)
		if a, b := m.get(t, "caddy_stabilize_connection_ids", "handler", "0"), m.get(t, "caddy_stabilize_connection_ids", "handler", "1"); max(a, b) < float64(maxConnectionIDs) {
			t.Fatalf("after the flood, the handlers' tables hold %v and %v entries, want one at the cap %d", a, b, maxConnectionIDs)
		}

		// A connection on B: its Initial, answered by its server from a
		// connection ID of 8 octets, its index and the DCID's first 7.
		dcid := []byte{0xb1, 1, 2, 3, 4, 5, 6, 7}
		server := exchangeLongHeader(t, newClient(t, lb), 0, dcid, []byte{0x5b, 0, 0, 0})
		serverCID := append([]byte{server}, dcid[:7]...)
		rebound := func(when string) {
			t.Helper()
			for i := range 4 {
				c := newClient(t, lb)
				if _, err := c.conn.Write(shortHeader(serverCID)); err != nil {
					t.Fatal(err)
				}
				if err := c.conn.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
					t.Fatal(err)
				}
				n, err := c.conn.Read(c.buf)
				if err != nil || n != 2 {
					t.Fatalf("%s, rebinding %d: no answer to a 1-RTT packet (%d octets, %v)", when, i, n, err)
				}
				if c.buf[1] != server {
					t.Errorf("%s, rebinding %d: the connection's 1-RTT packet reached server %d, not its server %d", when, i, c.buf[1], server)
				}
			}
		}
		rebound("with A's table full")

		// A reload of B's handler (the upstreams reversed) keeps B's table.
		body, _ := json.Marshal([]any{list[2], list[1], list[0]})
		adminDo(t, "PATCH", "http://"+admin+"/config/apps/layer4/servers/b/routes/0/handle/0/upstreams", string(body))
		rebound("after a reload")
	})
}
