package stabilize

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// netnsEnv marks a test process run in a network namespace of its own.
const netnsEnv = "STABILIZE_TEST_NETNS"

// inNetns runs the test again in a child process, in a new network
// namespace with only ports lo-hi ephemeral, and reports whether this is
// that child. It skips the test where namespaces cannot be made.
func inNetns(t *testing.T, lo, hi int) bool {
	t.Helper()
	if os.Getenv(netnsEnv) == t.Name() {
		return true
	}
	if os.Geteuid() != 0 {
		t.Skip("making a network namespace needs root")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("no unshare command")
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Skip("no ip command")
	}
	script := fmt.Sprintf(`%s link set lo up && echo "%d %d" > /proc/sys/net/ipv4/ip_local_port_range && exec "$@"`, ip, lo, hi)
	if out, err := exec.Command(unshare, "-n", "true").CombinedOutput(); err != nil {
		t.Skipf("no network namespace: %v: %s", err, out)
	}
	cmd := exec.Command(unshare, "-n", "sh", "-c", script, "sh", os.Args[0],
		"-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v", "-test.timeout=2m")
	cmd.Env = append(os.Environ(), netnsEnv+"="+t.Name())
	runChild(t, cmd)
	return false
}

// TestNoPortWall opens 2.5 times more flows than there are ephemeral ports
// (100, in a network namespace): per flow, spread over four upstreams from
// one source address, where flows share source ports, then moved off one
// that goes down to upstreams where their ports are taken; or over three
// source addresses to one upstream; per packet, over three source
// addresses. Every flow gets its own replies.
func TestNoPortWall(t *testing.T) {
	const lo, hi, flows = 40000, 40099, 250
	if !inNetns(t, lo, hi) {
		return
	}
	clientPort := 20000
	for _, tc := range []struct {
		name      string
		per       string
		upstreams int
		locals    []string
	}{
		{"upstreams", PerFlow, 4, nil},
		{"local_addresses", PerFlow, 1, []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}},
		{"local_addresses_per_packet", PerPacket, 1, []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			forNetworks(t, func(t *testing.T, network string) {
				var ups []*testUpstream
				for i := range tc.upstreams {
					ups = append(ups, startUpstream(t, fmt.Sprint("u", i)))
				}
				handler := handlerConfig(tc.per, "round_robin", ups...)
				if tc.locals != nil {
					handler["local_addresses"] = tc.locals
				}
				moves := tc.upstreams > 1
				if moves {
					handler["health_checks"] = map[string]any{"active": map[string]any{
						"send": "PING", "expect_prefix": "u", "interval": "100ms", "fails": 1}}
				}
				tr := trackHandlers(t)
				lb := startBalancerOn(t, network, false, 30*time.Second, handler)
				raddr := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(lb.addr))
				clients := make([]*client, flows)
				for i := range clients {
					clientPort++ // outside the ephemeral ports, which the flows need
					conn, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: clientPort}, raddr)
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { _ = conn.Close() })
					clients[i] = &client{t: t, conn: conn, buf: make([]byte, 2048)}
				}
				roundTrips := func(round int) {
					t.Helper()
					for i, cl := range clients {
						name, _, err := cl.roundTrip(fmt.Appendf(nil, "flow-%d-%d", i, round), 2*time.Second)
						if err != nil {
							t.Fatalf("round %d, flow %d: %v (drops %v)", round, i, err, tr.latest().Drops())
						}
						if round >= 2 && name == "u0" {
							t.Fatalf("round %d, flow %d: served by u0, which is down", round, i)
						}
					}
				}
				// Twice, so that every flow is open at once the second time.
				roundTrips(0)
				roundTrips(1)
				if moves {
					// u0's flows move to the other upstreams, where their
					// source ports are taken: they get new sockets.
					ups[0].silent.Store(true)
					u0 := tr.latest().byAddr[ups[0].addr]
					eventually(t, 2*time.Second, "u0 to be marked down", func() bool { return !u0.healthy() })
					roundTrips(2)
					roundTrips(3)
				}
				sources := 0 // flows seen by the upstreams
				ports := make(map[uint16]bool)
				for _, u := range ups {
					u.mu.Lock()
					for src, n := range u.sources {
						if n > 1 {
							sources++ // not only the health checks
						}
						ports[src.Port()] = true
						if p := src.Port(); p < lo || p > hi {
							t.Errorf("source port %d outside the ephemeral range", p)
						}
					}
					u.mu.Unlock()
				}
				if want := flows + flows/tc.upstreams*btoi(moves); sources < want || len(ports) > hi-lo+1 {
					t.Fatalf("%d sources on %d ports, want %d sources on at most %d ports", sources, len(ports), want, hi-lo+1)
				}
			})
		})
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestReplacedSocketWatched moves a flow to an upstream towards which
// another flow holds its source port, so the flow gets a new socket, while
// the reply reactor cannot watch it: the reactor's epoll descriptor stands
// for another file for a while. The flow's datagrams are dropped and
// counted until the reactor watches the new socket, then its replies
// arrive; a flow that forwarded on a socket the reactor did not watch
// would never see a reply. Per flow only: it alone connects its sockets.
// In a child process, as it swaps a reactor's descriptor.
func TestReplacedSocketWatched(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		if !inChild(t) {
			return
		}
		u0, u1 := startUpstream(t, "u0"), startUpstream(t, "u1")
		handler := handlerConfig(PerFlow, "round_robin", u0, u1)
		handler["health_checks"] = map[string]any{"active": map[string]any{
			"send": "PING", "expect_prefix": "u", "interval": "100ms", "fails": 1}}
		tr := trackHandlers(t)
		lb := startBalancerOn(t, network, false, 30*time.Second, handler)
		h := tr.latest()

		// A flow on u0 whose source port a flow on u1 holds.
		clients := make([]*client, 6)
		names := make([]string, len(clients))
		for i := range clients {
			clients[i] = newClient(t, lb.addr)
			names[i] = clients[i].mustRoundTrip(fmt.Sprint("open-", i))
		}
		var moving *client
		var fl *Flow
		for i, cl := range clients {
			if names[i] != "u0" {
				continue
			}
			f := flowOf(t, h, cl)
			f.mu.Lock()
			c := f.connection
			f.mu.Unlock()
			sourcePorts.Lock()
			s := sourcePorts.sets[portKey{c.src, u1.addr}]
			taken := s != nil && s.has(c.port)
			sourcePorts.Unlock()
			if taken {
				moving, fl = cl, f
				break
			}
		}
		if fl == nil {
			t.Fatal("no flow on u0 whose source port is taken towards u1")
		}

		// The reactor's descriptor stands for another file: adding a
		// socket to it fails.
		epfd := fl.reactor.epfd
		saved, err := unix.Dup(epfd)
		if err != nil {
			t.Fatal(err)
		}
		other, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Dup3(other, epfd, unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		_ = unix.Close(other)
		restored := false
		restore := func() {
			if !restored {
				restored = true
				if err := unix.Dup3(saved, epfd, unix.O_CLOEXEC); err != nil {
					t.Fatal(err)
				}
				_ = unix.Close(saved)
			}
		}
		defer restore()

		u0.silent.Store(true)
		up0 := h.byAddr[u0.addr]
		eventually(t, 2*time.Second, "u0 to be marked down", func() bool { return !up0.healthy() })
		before := h.drops[dropSocketUnavailable].Load()
		for i := range 3 {
			if _, _, err := moving.roundTrip(fmt.Append(nil, "unwatched-", i), 200*time.Millisecond); err == nil {
				t.Fatalf("datagram %d: a reply, though the reactor cannot watch the flow's new socket", i)
			}
		}
		if n := h.drops[dropSocketUnavailable].Load() - before; n != 3 {
			t.Errorf("%d datagrams counted as socket_unavailable, want 3", n)
		}
		if got := u1.gotPayload("unwatched-1") + u1.gotPayload("unwatched-2"); got != 0 {
			t.Errorf("u1 got %d datagrams sent on a socket whose replies nobody reads", got)
		}

		restore()
		for i := range 3 {
			name, _, err := moving.roundTrip(fmt.Append(nil, "watched-", i), 2*time.Second)
			if err != nil || name != "u1" {
				t.Fatalf("datagram %d after the reactor can watch again: reply from %q, %v; want one from u1", i, name, err)
			}
		}
	})
}

// flowOf returns h's flow of the client.
func flowOf(t *testing.T, h *Handler, cl *client) *Flow {
	t.Helper()
	addr := cl.conn.LocalAddr().(*net.UDPAddr).AddrPort()
	h.mu.Lock()
	defer h.mu.Unlock()
	for fl := range h.flows {
		if fl.client == addr {
			return fl
		}
	}
	t.Fatalf("no flow of client %v", addr)
	return nil
}

// TestParallelFlowsOwnPorts opens flows from many goroutines at once, per
// flow over two upstreams: ports are reserved under the table's lock but
// bound and connected outside it, and still no two flows share a source
// port towards one upstream: every flow gets its own replies, and each
// upstream sees one source per flow.
func TestParallelFlowsOwnPorts(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		const goroutines, each = 32, 8
		u0, u1 := startUpstream(t, "u0"), startUpstream(t, "u1")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(PerFlow, "round_robin", u0, u1))
		clients := make([]*client, goroutines*each)
		for i := range clients {
			clients[i] = newClient(t, lb.addr)
		}
		var wg sync.WaitGroup
		errs := make(chan error, len(clients))
		for g := range goroutines {
			wg.Go(func() {
				for i := g * each; i < (g+1)*each; i++ {
					if _, _, err := clients[i].roundTrip(fmt.Append(nil, "flow-", i), 2*time.Second); err != nil {
						errs <- fmt.Errorf("flow %d: %w", i, err)
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		sources := 0
		for _, u := range []*testUpstream{u0, u1} {
			u.mu.Lock()
			sources += len(u.sources)
			u.mu.Unlock()
		}
		if sources != len(clients) {
			t.Errorf("the upstreams saw %d sources, want one per flow: %d", sources, len(clients))
		}
	})
}

// TestPortHeldElsewhere holds the first source port with a socket that does
// not share it (no SO_REUSEADDR): per flow, the flows' sockets skip it and
// take the next ports, and every flow gets its replies. In a network
// namespace with twenty ephemeral ports.
func TestPortHeldElsewhere(t *testing.T) {
	const lo, hi = 40000, 40019
	if !inNetns(t, lo, hi) {
		return
	}
	forNetworks(t, func(t *testing.T, network string) {
		held, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: lo})
		if err != nil {
			t.Fatal(err)
		}
		defer held.Close()
		u := startUpstreamAt(t, "u", "127.0.0.1:30000") // outside the ephemeral ports
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(PerFlow, "", u))
		raddr := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(lb.addr))
		for i := range 3 {
			// From ports outside the ephemeral ones, which the flows need.
			conn, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 20000 + i}, raddr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			cl := &client{t: t, conn: conn, buf: make([]byte, 2048)}
			if _, _, err := cl.roundTrip(fmt.Append(nil, "flow-", i), 2*time.Second); err != nil {
				t.Fatalf("flow %d: %v", i, err)
			}
		}
		u.mu.Lock()
		defer u.mu.Unlock()
		for src := range u.sources {
			if p := src.Port(); p <= lo || p > hi {
				t.Errorf("a flow from port %d, want one of %d-%d", p, lo+1, hi)
			}
		}
	})
}
