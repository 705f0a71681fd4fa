package stabilize

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/quic-go/quic-go"
)

// connectionPaths are the two ways `per connection` finds a connection's
// server: the connection IDs learned from the servers' replies, and a
// QUIC-LB decode.
var connectionPaths = []struct {
	name   string
	quicLB bool
}{{"learned", false}, {"quic_lb", true}}

// TestConnectionHTTP3 sends HTTP/3 connections through `per connection` to
// three quic-go http3 servers: the policy spreads the connections, and each
// completes all its requests on one server.
func TestConnectionHTTP3(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		for _, path := range connectionPaths {
			t.Run(path.name, func(t *testing.T) {
				servers := startH3Servers(t, 3, h3Options{quicLB: path.quicLB})
				lb := startBalancerOn(t, network, false, 30*time.Second,
					h3Handler(PerConnection, "round_robin", path.quicLB, servers...))
				used := map[string]int{}
				for i := range 6 {
					c := dialH3(t, lb.addr)
					first := c.mustGet()
					for range 3 {
						if got := c.mustGet(); got != first {
							t.Fatalf("connection %d: answered by %s, then %s", i, first, got)
						}
					}
					used[first]++
				}
				for _, s := range servers {
					if used[s.name] != 2 {
						t.Errorf("round robin over 3 servers, 6 connections: %v", used)
						break
					}
				}
			})
		}
	})
}

// TestConnectionRebinding moves a connection's client to a new source port
// (a NAT rebinding) mid-connection: through `per connection` it continues
// on its server, found by the learned connection ID or by QUIC-LB; through
// `per flow`, the control, the new port goes to another server and the
// connection breaks.
func TestConnectionRebinding(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		cases := []struct {
			name, per string
			quicLB    bool
			survives  bool
		}{
			{"learned", PerConnection, false, true},
			{"quic_lb", PerConnection, true, true},
			{"per_flow", PerFlow, false, false},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				servers := startH3Servers(t, 2, h3Options{quicLB: tc.quicLB})
				lb := startBalancerOn(t, network, false, 30*time.Second,
					h3Handler(tc.per, "round_robin", tc.quicLB, servers...))
				r := startRelay(t, lb.addr)
				c := dialH3(t, r.addr())
				first := c.mustGet()
				before := r.port()
				r.rebind()
				if r.port() == before {
					t.Fatal("the relay kept its port")
				}
				got, err := c.get(3 * time.Second)
				switch {
				case tc.survives && err != nil:
					t.Fatalf("after rebinding: %v", err)
				case tc.survives && got != first:
					t.Fatalf("answered by %s, then by %s after rebinding", first, got)
				case !tc.survives && err == nil:
					t.Fatalf("per flow: the connection survived rebinding (answered by %s, then %s)", first, got)
				}
				if tc.survives {
					for range 3 {
						if got := c.mustGet(); got != first {
							t.Fatalf("answered by %s, then by %s", first, got)
						}
					}
				}
			})
		}
	})
}

// TestConnectionMigration migrates a client to a new local socket (RFC 9000
// active migration). On the new path the client uses a connection ID the
// balancer has never seen: with QUIC-LB the balancer decodes it and the
// connection continues on its server; without (the control), the probe
// goes to the other server and the path never validates.
func TestConnectionMigration(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		for _, path := range connectionPaths {
			t.Run(path.name, func(t *testing.T) {
				servers := startH3Servers(t, 2, h3Options{quicLB: path.quicLB})
				lb := startBalancerOn(t, network, false, 30*time.Second,
					h3Handler(PerConnection, "round_robin", path.quicLB, servers...))
				c := dialH3(t, lb.addr)
				first := c.mustGet()
				// The server issues its spare connection IDs after the
				// handshake; the migration needs one.
				time.Sleep(100 * time.Millisecond)
				newTr := &quic.Transport{Conn: listenLocalUDP(t)}
				t.Cleanup(func() { _ = newTr.Close() })
				p, err := c.conn.AddPath(newTr)
				if err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
				defer cancel()
				err = p.Probe(ctx)
				if !path.quicLB {
					if err == nil {
						t.Fatal("without QUIC-LB, the new path validated")
					}
					return
				}
				if err != nil {
					t.Fatalf("probing the new path: %v", err)
				}
				if err := p.Switch(); err != nil {
					t.Fatal(err)
				}
				for range 3 {
					if got := c.mustGet(); got != first {
						t.Fatalf("answered by %s, then by %s after migrating", first, got)
					}
				}
			})
		}
	})
}

// TestConnectionRetry completes handshakes with servers that validate every
// client address with Retry, through round robin: the client's second
// Initial carries the connection ID the server chose in its Retry, which
// the balancer learned and routes to that server.
func TestConnectionRetry(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		servers := startH3Servers(t, 3, h3Options{retry: true})
		lb := startBalancerOn(t, network, false, 30*time.Second,
			h3Handler(PerConnection, "round_robin", false, servers...))
		used := map[string]bool{}
		for i := range 6 {
			c := dialH3(t, lb.addr)
			first := c.mustGet()
			if got := c.mustGet(); got != first {
				t.Fatalf("connection %d: answered by %s, then %s", i, first, got)
			}
			used[first] = true
		}
		if len(used) < 2 {
			t.Errorf("connections went to %v only", used)
		}
	})
}

// TestConnectionTwoBalancers sends the packets of each connection
// alternately through two balancers with the same QUIC-LB config and
// maglev, one in this process and one in a child process, so that they
// share nothing: they pick the same server for its Initials and decode the
// same server from its connection IDs.
func TestConnectionTwoBalancers(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		servers := startH3Servers(t, 3, h3Options{quicLB: true})
		h := h3Handler(PerConnection, "maglev", true, servers...)
		lb1 := startBalancerOn(t, network, false, 30*time.Second, h)
		lb2 := startChildBalancer(t, network, h)
		used := map[string]bool{}
		for i := range 6 {
			r := startRelay(t, lb1.addr, lb2)
			c := dialH3(t, r.addr())
			first := c.mustGet()
			for range 4 {
				if got := c.mustGet(); got != first {
					t.Fatalf("connection %d: answered by %s, then %s", i, first, got)
				}
			}
			used[first] = true
		}
		if len(used) < 2 {
			t.Errorf("maglev sent every connection to %v", used)
		}
		// Each Initial DCID reached one server only: the balancers agreed.
		seen := map[string]string{}
		for _, s := range servers {
			for _, dcid := range s.initialDCIDs() {
				if other, dup := seen[dcid]; dup {
					t.Errorf("Initials with DCID %x reached %s and %s", dcid, other, s.name)
				}
				seen[dcid] = s.name
			}
		}
	})
}

// balancerEnv holds the config a child balancer process loads.
const balancerEnv = "STABILIZE_TEST_BALANCER"

// startChildBalancer runs a balancer with handler on network in a child
// process of the test binary, until the test ends, and returns its address.
func startChildBalancer(t *testing.T, network string, handler any) string {
	t.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildBalancer$", "-test.count=1")
	cmd.Env = append(os.Environ(), balancerEnv+"="+string(testConfigOn(network, addr, "", 30*time.Second, handler)))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("child balancer: %q, %v", line, err)
	}
	return addr
}

// TestChildBalancer is the child process of startChildBalancer: it loads
// the config, says "ready" and runs until its standard input closes.
func TestChildBalancer(t *testing.T) {
	cfg := os.Getenv(balancerEnv)
	if cfg == "" {
		t.Skip("run by startChildBalancer")
	}
	if err := caddy.Load([]byte(cfg), true); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = caddy.Stop() }()
	fmt.Println("ready")
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
	}
}

// TestConnectionReload changes the upstreams through the admin API while a
// connection is open: the new handler inherits the learned table, and the
// connection stays on its server. The table's size is a metric.
func TestConnectionReload(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		servers := startH3Servers(t, 3, h3Options{})
		lb := startBalancerOn(t, network, true, 30*time.Second,
			h3Handler(PerConnection, "round_robin", false, servers[:2]...))
		listener := netip.MustParseAddrPort(lb.addr)
		old := tr.latest().router.(*perConnectionRouter).table(listener)
		c := dialH3(t, lb.addr)
		first := c.mustGet()
		if old.len() == 0 {
			t.Fatal("nothing learned")
		}
		m := scrape(t, lb.admin)
		if n := m.get(t, "caddy_stabilize_connection_ids", "handler", "0"); n < 1 {
			t.Errorf("connection_ids %v, want the table's entries", n)
		}
		if n := m.get(t, "caddy_stabilize_connection_down_datagrams_total", "handler", "0"); n != 0 {
			t.Errorf("connection_down_datagrams_total %v, want 0", n)
		}
		m.get(t, "caddy_stabilize_connection_id_misses_total", "handler", "0")
		// Reverse the upstreams and add the third: round robin would now
		// pick differently.
		ups := []any{map[string]any{"dial": servers[2].dial()}, map[string]any{"dial": servers[1].dial()}, map[string]any{"dial": servers[0].dial()}}
		body, _ := json.Marshal(ups)
		adminDo(t, "PATCH", "http://"+lb.admin+"/config/apps/layer4/servers/srv0/routes/0/handle/0/upstreams", string(body))
		// Before any new flow reaches the new handler, its metric counts
		// the table it inherits.
		if n := scrape(t, lb.admin).get(t, "caddy_stabilize_connection_ids", "handler", "0"); n < float64(old.len()) {
			t.Errorf("connection_ids %v after the reload, want the inherited table's %d entries", n, old.len())
		}
		if now := tr.latest().router.(*perConnectionRouter).table(listener); now != old {
			t.Fatal("the reload replaced the learned table")
		}
		for range 3 {
			if got := c.mustGet(); got != first {
				t.Fatalf("answered by %s, then by %s after the reload", first, got)
			}
		}
	})
}
