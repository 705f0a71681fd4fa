package stabilize

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
)

// A listener bound to an unspecified address must reply from the address
// each client sent to: a client connected to 127.0.0.2 drops a reply from
// 127.0.0.1, the address the route picks, as NATs and firewalls do on a
// host with several addresses. 127.0.0.0/8 is the loopback's on Linux.

// wildListens are the unspecified listener addresses the tests run on.
// Both give a dual-stack socket (IPv4 clients as mapped addresses): Go's
// "udp" network listens on [::] for 0.0.0.0 too, so an IPv4-only socket
// (IP_PKTINFO alone) is tested in udpio only (wildCases, "udp4").
var wildListens = []string{":%d", "0.0.0.0:%d"}

// caddyL4NoDst is why the udp/ cases of these tests are skipped.
const caddyL4NoDst = "caddy-l4 v0.1.2 reads udp/ listeners with ReadFrom, without the destination address " +
	"(IP_PKTINFO), so replies leave from the route's address (README, Limits); fastudp/ reads it"

// startBalancerAt is startBalancerOn with the listener at listen, a
// format of the port that freeUDPPort picks.
func startBalancerAt(t testing.TB, network, listen string, handler any) int {
	t.Helper()
	port := freeUDPPort(t)
	loadCaddy(t, testConfigOn(network, fmt.Sprintf(listen, port), "", 30*time.Second, handler))
	return port
}

// wildDsts are the host addresses the clients send to; ::1 only on the
// dual-stack listener, and where the host has it.
func wildDsts(listen string) []string {
	if listen == ":%d" {
		return []string{"127.0.0.2", "127.0.0.1", "::1"}
	}
	return []string{"127.0.0.2", "127.0.0.1"}
}

// routed reports whether the route's source address to a client on the
// loopback is dst: replies from it arrive whichever address the socket
// replies from.
func routed(dst string) bool { return dst == "127.0.0.1" || dst == "::1" }

// dialWild connects a client to port at dst, or skips the test where the
// host has no such address.
func dialWild(t *testing.T, dst string, port int) *client {
	t.Helper()
	to := netip.AddrPortFrom(netip.MustParseAddr(dst), uint16(port))
	if c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to)); err != nil {
		t.Skipf("no %s here: %v", dst, err)
	} else {
		_ = c.Close()
	}
	return newClient(t, to.String())
}

// TestWildcardReplySource: on a listener bound to an unspecified address,
// a client connected to 127.0.0.2, and one to 127.0.0.1 (and ::1), each
// get their replies, the first (through caddy-l4) and the later ones
// (bypassing it on fastudp/), on every granularity; and an unconnected
// client that sends to another of the host's addresses from the same port
// gets its replies from that address from then on.
func TestWildcardReplySource(t *testing.T) {
	for _, listen := range wildListens {
		t.Run(fmt.Sprintf(listen, 0), func(t *testing.T) {
			forPaths(t, granularities, func(t *testing.T, network, per string) {
				a := startUpstream(t, "a")
				port := startBalancerAt(t, network, listen, handlerConfig(per, "", a))
				for _, dst := range wildDsts(listen) {
					t.Run(dst, func(t *testing.T) {
						if network == "udp" && !routed(dst) {
							t.Skip(caddyL4NoDst)
						}
						cl := dialWild(t, dst, port)
						for i := range 3 {
							if name := cl.mustRoundTrip(fmt.Sprintf("hello-%d", i)); name != "a" {
								t.Fatalf("reply from %q", name)
							}
						}
					})
				}
				t.Run("moving", func(t *testing.T) {
					if network == "udp" {
						t.Skip(caddyL4NoDst)
					}
					c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
					if err != nil {
						t.Fatal(err)
					}
					defer c.Close()
					buf := make([]byte, 128)
					for i, dst := range []string{"127.0.0.2", "127.0.0.3", "127.0.0.1", "127.0.0.2"} {
						to := netip.AddrPortFrom(netip.MustParseAddr(dst), uint16(port))
						if _, err := c.WriteToUDPAddrPort([]byte(fmt.Sprint("to-", i)), to); err != nil {
							t.Fatal(err)
						}
						_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
						n, from, err := c.ReadFromUDPAddrPort(buf)
						if err != nil {
							t.Fatalf("datagram %d, to %v: %v", i, to, err)
						}
						if from != to || string(buf[:n]) != fmt.Sprint("a|to-", i) {
							t.Errorf("datagram %d, to %v: reply %q from %v", i, to, buf[:n], from)
						}
					}
				})
			})
		})
	}
}

// TestWildcardProxyV2: on a fastudp/ listener bound to an unspecified
// address, the PROXY v2 header's destination is the address and port the
// client sent to, for the datagram that opens the flow and the later ones;
// not the listener's 0.0.0.0 or [::].
func TestWildcardProxyV2(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		if network == "udp" {
			t.Skip(caddyL4NoDst)
		}
		up := startRawUpstream(t, false, true)
		h := rawHandler(per, up)
		h["proxy_protocol"] = "v2"
		port := startBalancerAt(t, network, ":%d", h)
		sent := 0
		for _, dst := range []string{"127.0.0.2", "127.0.0.1"} {
			cl := dialWild(t, dst, port)
			client := cl.conn.LocalAddr().(*net.UDPAddr).AddrPort()
			want := netip.AddrPortFrom(netip.MustParseAddr(dst), uint16(port)).String()
			for _, p := range []string{"first", "second", "third"} {
				if _, err := cl.conn.Write([]byte(p)); err != nil {
					t.Fatal(err)
				}
				sent++
				eventually(t, 2*time.Second, fmt.Sprintf("the upstream to receive datagram %d", sent), func() bool {
					return up.got.Load() >= int64(sent)
				})
				if err := checkProxyV2(up.recorded()[sent-1], client, want, p); err != nil {
					t.Errorf("datagram %q to %s: %v", p, dst, err)
				}
			}
		}
	})
}

// sourceFilter is a client's socket that takes only packets from want, as
// a connected socket does, and counts the others.
type sourceFilter struct {
	net.PacketConn
	want  netip.AddrPort
	other atomic.Int64
}

func (f *sourceFilter) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, addr, err := f.PacketConn.ReadFrom(b)
		if err != nil {
			return n, addr, err
		}
		if ap := addr.(*net.UDPAddr).AddrPort(); netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) == f.want {
			return n, addr, nil
		}
		f.other.Add(1)
	}
}

// TestWildcardQUIC: a balancer terminating QUIC on a fastudp/ listener
// bound to an unspecified address completes the handshake and a stream
// round trip with a client of 127.0.0.2 that takes packets from that
// address only: quic-go learns the address from the datagrams' control
// messages (quicConn.ReadBatch) and sends from it.
func TestWildcardQUIC(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		if network == "udp" {
			t.Skip(caddyL4NoDst)
		}
		b := startQUICBackend(t, "a")
		port := startBalancerAt(t, network, ":%d", quicHandler(t, "", "", nil, b.dial()))
		for _, dst := range []string{"127.0.0.2", "127.0.0.1"} {
			pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			to := netip.AddrPortFrom(netip.MustParseAddr(dst), uint16(port))
			f := &sourceFilter{PacketConn: pc, want: to}
			tr := &quic.Transport{Conn: f}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(to), quicClientTLS(t), &quic.Config{})
			cancel()
			if err != nil {
				t.Fatalf("handshake with %v: %v (%d packets from elsewhere)", to, err, f.other.Load())
			}
			if name := mustExchange(t, c, []byte("hello "+dst)); name != "a" {
				t.Errorf("%s: reply from %q", dst, name)
			}
			if n := f.other.Load(); n > 0 {
				t.Errorf("%s: %d packets from another address", dst, n)
			}
			_ = c.CloseWithError(0, "")
			_ = tr.Close()
			_ = pc.Close()
		}
	})
}

// BenchmarkWildcardRoundTrip is BenchmarkRoundTrip on fastudp/ with the
// listener on an unspecified address, where each datagram's destination
// is read and each reply names it as its source, with a client of
// 127.0.0.1, whose replies the route's address reaches too: it measures
// what the destination costs.
func BenchmarkWildcardRoundTrip(b *testing.B) {
	for _, per := range []string{"packet", "flow"} {
		b.Run(per, func(b *testing.B) {
			a, c := startUpstream(b, "a"), startUpstream(b, "c")
			port := startBalancerAt(b, FastNetwork, ":%d", handlerConfig(per, "", a, c))
			benchRoundTrips(b, newClient(b, fmt.Sprint("127.0.0.1:", port)))
		})
	}
}

// TestWildcardWarnsOnce: a handler behind a udp/ listener bound to an
// unspecified address warns once, not per flow, that replies leave from the
// route's address; on fastudp/, or on a udp/ listener bound to one address,
// it does not warn.
func TestWildcardWarnsOnce(t *testing.T) {
	for _, tc := range []struct {
		network, listen string
		want            int
	}{
		{"udp", ":%d", 1},
		{"udp", "127.0.0.1:%d", 0},
		{FastNetwork, ":%d", 0},
	} {
		t.Run(tc.network+"/"+fmt.Sprintf(tc.listen, 0), func(t *testing.T) {
			a := startUpstream(t, "a")
			port, logFile := startBalancerLogged(t, tc.network, tc.listen, handlerConfig("flow", "", a))
			for i := range 3 { // three flows
				newClient(t, fmt.Sprint("127.0.0.1:", port)).mustRoundTrip(fmt.Sprint("flow-", i))
			}
			logged, err := os.ReadFile(logFile)
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Count(string(logged), "bound to an unspecified address"); got != tc.want {
				t.Errorf("warned %d times, want %d:\n%s", got, tc.want, logged)
			}
		})
	}
}

// TestWildcardBroadcast: on an IPv4 listener bound to 0.0.0.0, a client
// that sends to the loopback's broadcast address, 127.255.255.255, gets
// its replies, from the address the kernel names for replies to it
// (ipi_spec_dst, 127.0.0.1), as before the listener read destinations: a
// broadcast address is no source, and a reply from it fails (ENETUNREACH).
func TestWildcardBroadcast(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a := startUpstream(t, "a")
		port := startBalancerAt(t, network, "0.0.0.0:%d", handlerConfig(per, "", a))
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		rc, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_BROADCAST, 1)
		}); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
		to := netip.AddrPortFrom(netip.MustParseAddr("127.255.255.255"), uint16(port))
		buf := make([]byte, 128)
		for i := range 3 {
			if _, err := c.WriteToUDPAddrPort([]byte(fmt.Sprint("bcast-", i)), to); err != nil {
				t.Skipf("no broadcast on the loopback here: %v", err)
			}
			want := fmt.Sprint("a|bcast-", i)
			for {
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
				n, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatalf("datagram %d to %v: %v", i, to, err)
				}
				if string(buf[:n]) != want {
					continue // a copy of an earlier one: every reader's socket gets a broadcast
				}
				if from.Addr() != netip.MustParseAddr("127.0.0.1") {
					t.Errorf("datagram %d: reply from %v", i, from)
				}
				break
			}
		}
	})
}

// linkLocalPair finds an interface's IPv6 link-local address and another
// IPv6 address of the same interface to send to it from, or skips.
func linkLocalPair(t *testing.T) (ll, from netip.Addr) {
	t.Helper()
	ifis, err := net.Interfaces()
	if err != nil {
		t.Skip(err)
	}
	for _, ifi := range ifis {
		addrs, _ := ifi.Addrs()
		ll, from = netip.Addr{}, netip.Addr{}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, _ := netip.AddrFromSlice(ipn.IP)
			switch {
			case !ip.Is6() || ip.Is4In6():
			case ip.IsLinkLocalUnicast():
				ll = ip.WithZone(ifi.Name)
			case !ip.IsLoopback():
				from = ip
			}
		}
		if ll.IsValid() && from.IsValid() {
			return ll, from
		}
	}
	t.Skip("no interface with an IPv6 link-local address and another IPv6 address")
	return
}

// TestWildcardLinkLocal: on a listener bound to [::], a client that sends
// to one of the host's IPv6 link-local addresses gets its replies, from
// the address the route picks, as before the listener read destinations:
// a link-local source needs its interface, and with index 0 a send from
// it fails (EINVAL).
func TestWildcardLinkLocal(t *testing.T) {
	ll, from := linkLocalPair(t)
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a := startUpstream(t, "a")
		port := startBalancerAt(t, network, ":%d", handlerConfig(per, "", a))
		c, err := net.ListenUDP("udp6", net.UDPAddrFromAddrPort(netip.AddrPortFrom(from, 0)))
		if err != nil {
			t.Skip(err)
		}
		defer c.Close()
		to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(ll, uint16(port)))
		buf := make([]byte, 128)
		for i := range 3 {
			if _, err := c.WriteToUDP([]byte(fmt.Sprint("ll-", i)), to); err != nil {
				t.Skipf("cannot send to %v: %v", to, err)
			}
			_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, _, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("datagram %d to %v: %v", i, to, err)
			}
			if string(buf[:n]) != fmt.Sprint("a|ll-", i) {
				t.Errorf("datagram %d: reply %q", i, buf[:n])
			}
		}
	})
}

// TestWildcardSourceGone: on a fastudp/ listener bound to [::], a flow
// replies from the address its client sent to, 10.77.0.1; that address is
// then removed from the host (as when a virtual address moves to another
// machine) while an upstream's two replies are on their way. They still
// arrive, from the route's address, as before replies named a source, no
// write_error is counted, and the handler warns once. In a network
// namespace of its own. Then the same with fastudp.Front.WriteTo, through
// which caddy-l4's own handlers reply.
func TestWildcardSourceGone(t *testing.T) {
	if !inNetns(t, 32768, 60999) {
		return
	}
	for _, per := range []string{PerPacket, PerFlow} {
		t.Run(FastNetwork+"/"+per, func(t *testing.T) {
			// udp/: caddy-l4 cannot tell the destination (caddyL4NoDst).
			addVIP(t)
			up := startSlowUpstream(t, 300*time.Millisecond)
			tr := trackHandlers(t)
			handler := map[string]any{"handler": "stabilize", "upstreams": []any{map[string]any{"dial": up.dial()}}, "per": per}
			port, logFile := startBalancerLogged(t, FastNetwork, ":%d", handler)
			c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			to := netip.AddrPortFrom(netip.MustParseAddr(testVIP), uint16(port))
			send := func(payload string) {
				if _, err := c.WriteToUDPAddrPort([]byte(payload), to); err != nil {
					t.Fatal(err)
				}
			}
			send("first")
			if from := readReply(t, c, "first"); from != to {
				t.Fatalf("first reply from %v, want %v", from, to)
			}
			send("second")
			// The upstream has the datagram well before its 300 ms are up.
			for deadline := time.Now().Add(2 * time.Second); up.got.Load() < 2 && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond)
			}
			ipCmd(t, "addr", "del", testVIP+"/32", "dev", "lo")
			for i := range 2 {
				if from := readReply(t, c, "second"); from.Addr() != netip.MustParseAddr("127.0.0.1") {
					t.Errorf("second reply %d from %v, want the route's address 127.0.0.1", i, from)
				}
			}
			h := tr.latest()
			if h == nil {
				t.Fatal("no handler")
			}
			if d := h.Drops()["write_error"]; d != 0 {
				t.Errorf("write_error %d, want 0", d)
			}
			logged, err := os.ReadFile(logFile)
			if err != nil {
				t.Fatal(err)
			}
			if n := strings.Count(string(logged), `"source":"`+testVIP+`"`); n != 1 {
				t.Errorf("%d warnings naming %s, want 1:\n%s", n, testVIP, logged)
			}
		})
	}
	t.Run("front", func(t *testing.T) {
		addVIP(t)
		port := freeUDPPort(t)
		front, err := fastudp.Listen(fmt.Sprint(":", port), 1)
		if err != nil {
			t.Fatal(err)
		}
		defer front.Close()
		core, logs := observer.New(zap.WarnLevel)
		front.SetLogger(zap.New(core))
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		to := netip.AddrPortFrom(netip.MustParseAddr(testVIP), uint16(port))
		buf := make([]byte, 128)
		if _, err := c.WriteToUDPAddrPort([]byte("hello"), to); err != nil {
			t.Fatal(err)
		}
		_, client, err := front.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		for i, want := range []string{testVIP, "127.0.0.1", "127.0.0.1"} {
			if i == 1 {
				ipCmd(t, "addr", "del", testVIP+"/32", "dev", "lo")
			}
			if _, err := front.WriteTo([]byte("reply"), client); err != nil {
				t.Fatalf("reply %d: %v", i, err)
			}
			if from := readReply(t, c, "reply"); from.Addr().String() != want {
				t.Errorf("reply %d from %v, want %s", i, from, want)
			}
		}
		if n := logs.FilterField(zap.Stringer("source", netip.MustParseAddr(testVIP))).Len(); n != 1 {
			t.Errorf("%d warnings naming %s, want 1: %v", n, testVIP, logs.All())
		}
	})
}

// testVIP is the address TestWildcardSourceGone adds to lo and removes.
const testVIP = "10.77.0.1"

// addVIP adds testVIP to lo, until the test ends if it is still there.
func addVIP(t *testing.T) {
	t.Helper()
	ipCmd(t, "addr", "add", testVIP+"/32", "dev", "lo")
	t.Cleanup(func() { _ = exec.Command("ip", "addr", "del", testVIP+"/32", "dev", "lo").Run() })
}

// ipCmd runs the ip command (inNetns skips a test where there is none).
func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %v: %v: %s", args, err, out)
	}
}

// readReply reads a datagram from c, which must be want, and returns its
// source.
func readReply(t *testing.T, c *net.UDPConn, want string) netip.AddrPort {
	t.Helper()
	buf := make([]byte, 128)
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("waiting for %q: %v", want, err)
	}
	if string(buf[:n]) != want {
		t.Fatalf("reply %q, want %q", buf[:n], want)
	}
	return from
}

// startBalancerLogged is startBalancerAt with Caddy's warnings logged, as
// JSON, to the file it returns.
func startBalancerLogged(t *testing.T, network, listen string, handler any) (port int, logFile string) {
	t.Helper()
	port = freeUDPPort(t)
	var cfg map[string]any
	if err := json.Unmarshal(testConfigOn(network, fmt.Sprintf(listen, port), "", 30*time.Second, handler), &cfg); err != nil {
		t.Fatal(err)
	}
	logFile = filepath.Join(t.TempDir(), "caddy.log")
	logToFile(cfg, "WARN", logFile)
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	loadCaddy(t, b)
	return port, logFile
}

// slowUpstream answers each datagram it receives: the first at once, each
// later one twice, after a delay, 50 ms apart.
type slowUpstream struct {
	conn *net.UDPConn
	got  atomic.Int64
}

func startSlowUpstream(t *testing.T, delay time.Duration) *slowUpstream {
	t.Helper()
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	u := &slowUpstream{conn: conn}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if u.got.Add(1) > 1 {
				time.Sleep(delay)
				_, _ = conn.WriteToUDPAddrPort(buf[:n], from)
				time.Sleep(50 * time.Millisecond) // the next in another send
			}
			_, _ = conn.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	t.Cleanup(func() {
		_ = conn.Close()
		<-done
	})
	return u
}

func (u *slowUpstream) dial() string { return "udp/" + u.conn.LocalAddr().String() }
