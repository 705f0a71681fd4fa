package stabilize

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/quic-go/quic-go"
)

// dialQUICFrom connects to addr through a transport on its own socket,
// which the test can then migrate away from.
func dialQUICFrom(t *testing.T, addr string) (*quic.Conn, *quic.Transport) {
	t.Helper()
	tr := newClientTransport(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)), quicClientTLS(t), &quic.Config{EnableDatagrams: true})
	if err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = c.CloseWithError(0, "") })
	return c, tr
}

func newClientTransport(t *testing.T) *quic.Transport {
	t.Helper()
	sock, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: sock}
	t.Cleanup(func() {
		_ = tr.Close()
		_ = sock.Close()
	})
	return tr
}

// TestQUICMigration: a client that moves to a new local socket (path
// probe, then switch) arrives as a new flow and keeps its connection and
// its backend.
func TestQUICMigration(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, b.dial()))
		c, _ := dialQUICFrom(t, lb.addr)
		mustExchange(t, c, []byte("before"))
		sock, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		counted := &countingConn{UDPConn: sock}
		tr2 := &quic.Transport{Conn: counted}
		t.Cleanup(func() {
			_ = tr2.Close()
			_ = sock.Close()
		})
		path, err := c.AddPath(tr2)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := path.Probe(ctx); err != nil {
			t.Fatalf("probing the new path: %v", err)
		}
		if err := path.Switch(); err != nil {
			t.Fatalf("switching to the new path: %v", err)
		}
		before := counted.writes.Load()
		for range 3 {
			mustExchange(t, c, []byte("after"))
		}
		if counted.writes.Load()-before < 3 {
			t.Fatal("the client does not send from its new socket")
		}
		if n := b.conns.Load(); n != 1 {
			t.Fatalf("backend connections: %d, want 1", n)
		}
	})
}

// countingConn counts the datagrams written. It stays a UDP socket to
// quic-go, which cannot migrate from one to a plain PacketConn.
type countingConn struct {
	*net.UDPConn
	writes atomic.Int64
}

func (c *countingConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	c.writes.Add(1)
	return c.UDPConn.WriteTo(b, addr)
}

func (c *countingConn) WriteMsgUDP(b, oob []byte, addr *net.UDPAddr) (int, int, error) {
	c.writes.Add(1)
	return c.UDPConn.WriteMsgUDP(b, oob, addr)
}

// natRelay forwards a client's datagrams to target from a socket whose
// port it can change, as a NAT that rebinds.
type natRelay struct {
	front  *net.UDPConn
	target netip.AddrPort
	back   atomic.Pointer[net.UDPConn]
	client atomic.Pointer[netip.AddrPort]
}

func startNATRelay(t *testing.T, target string) *natRelay {
	t.Helper()
	front, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	r := &natRelay{front: front, target: netip.MustParseAddrPort(target)}
	r.rebind(t)
	t.Cleanup(func() {
		_ = front.Close()
		_ = r.back.Load().Close()
	})
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := front.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			r.client.Store(&from)
			_, _ = r.back.Load().WriteToUDPAddrPort(buf[:n], r.target)
		}
	}()
	return r
}

// rebind moves the relay to a new source port; the old one closes.
func (r *natRelay) rebind(t *testing.T) {
	back, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	if old := r.back.Swap(back); old != nil {
		_ = old.Close()
	}
	go func() {
		buf := make([]byte, 65535)
		for {
			n, err := back.Read(buf)
			if err != nil {
				return
			}
			if c := r.client.Load(); c != nil {
				_, _ = r.front.WriteToUDPAddrPort(buf[:n], *c)
			}
		}
	}()
}

func (r *natRelay) addr() string { return r.front.LocalAddr().String() }

// TestQUICNATRebinding: a client whose NAT changes its source port keeps
// its connection and its backend.
func TestQUICNATRebinding(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, b.dial()))
		nat := startNATRelay(t, lb.addr)
		c := dialQUIC(t, nat.addr(), nil, quicClientTLS(t))
		mustExchange(t, c, []byte("before"))
		for range 2 {
			nat.rebind(t)
			for range 3 {
				mustExchange(t, c, []byte("after"))
			}
		}
		if n := b.conns.Load(); n != 1 {
			t.Fatalf("backend connections: %d, want 1", n)
		}
	})
}

// TestQUICReload: a config reload that adds an upstream keeps an open
// connection working, on its backend; new connections use the new list.
func TestQUICReload(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b := startQUICBackend(t, "a"), startQUICBackend(t, "b")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, a.dial()))
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		mustExchange(t, c, []byte("before"))
		cfg := testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, "", "round_robin", nil, b.dial(), a.dial()))
		if err := caddy.Load(cfg, true); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if got := mustExchange(t, c, []byte("after")); got != "a" {
				t.Fatalf("the open connection moved to %s", got)
			}
		}
		got := map[string]int{}
		for range 4 {
			c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
			got[mustExchange(t, c, []byte("new"))]++
		}
		if got["a"] != 2 || got["b"] != 2 {
			t.Fatalf("new connections after the reload: %v, want 2 each", got)
		}
	})
}

// TestQUICDualStackListener: on a listener of every interface (an IPv6
// socket that also takes IPv4), an IPv4 client's address keeps one form,
// so Retry tokens validate and replies reach it.
func TestQUICDualStackListener(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "a")
		port := freeUDPPort(t)
		cfg := testConfigOn(network, ":"+itoa(int64(port)), "", 30*time.Second,
			quicHandler(t, "", "", map[string]any{"stateless_retry": true}, b.dial()))
		if err := caddy.Load(cfg, true); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = caddy.Stop() })
		c := dialQUIC(t, "127.0.0.1:"+itoa(int64(port)), nil, quicClientTLS(t))
		mustExchange(t, c, []byte("v4 on a dual-stack socket"))
	})
}

// TestQUICReloadsUnderTraffic: 20 config changes while one connection
// keeps exchanging; it never breaks and stays on its backend. On udp/ each
// reload replaces the listener socket: replies between the close of one and
// the client's first datagram through the next go through the transport's
// hold of the old one.
func TestQUICReloadsUnderTraffic(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b := startQUICBackend(t, "a"), startQUICBackend(t, "b")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, a.dial()))
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		mustExchange(t, c, []byte("before"))
		fds := openFDs(t)
		done := make(chan error, 1)
		go func() {
			for i := range 20 {
				ups := []string{a.dial()}
				if i%2 == 0 {
					ups = append(ups, b.dial())
				}
				if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, "", "", nil, ups...)), true); err != nil {
					done <- err
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
			done <- nil
		}()
		n := 0
		for {
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
				if got := mustExchange(t, c, []byte("after")); got != "a" || n == 0 {
					t.Fatalf("after the reloads: reply from %s, %d exchanges during them", got, n)
				}
				if now := openFDs(t); now > fds+4 {
					t.Fatalf("open files: %d before the reloads, %d after", fds, now)
				}
				return
			default:
			}
			if got := mustExchange(t, c, []byte("during")); got != "a" {
				t.Fatalf("the connection moved to %s", got)
			}
			n++
		}
	})
}

// TestQUICReloadNewClient: after reloads with no traffic, new clients are
// served, and the connection opened before them still works.
func TestQUICReloadNewClient(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a := startQUICBackend(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, a.dial()))
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		mustExchange(t, c, []byte("before"))
		for range 3 {
			if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, "", "round_robin", nil, a.dial())), true); err != nil {
				t.Fatal(err)
			}
		}
		for i := range 10 {
			c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
			if got := mustExchange(t, c, []byte("new")); got != "a" {
				t.Fatalf("client %d: reply from %s", i, got)
			}
		}
		mustExchange(t, c, []byte("old connection"))
	})
}
