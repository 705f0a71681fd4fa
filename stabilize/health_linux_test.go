package stabilize

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// A socket set up by prepareSocket reports an ICMP port-unreachable from an
// unconnected send, and its error queue names the destination that drew it.
func TestErrQueueNamesTheUpstream(t *testing.T) {
	for _, network := range []string{"udp4", "udp"} {
		t.Run(network, func(t *testing.T) {
			h := &Handler{
				HealthChecks: &HealthChecks{Passive: &PassiveHealthChecks{}},
				ReadBuffer:   1 << 16,
				WriteBuffer:  1 << 16,
			}
			conn, err := net.ListenUDP(network, nil)
			if err != nil {
				t.Skipf("no %s socket: %v", network, err)
			}
			defer conn.Close()
			if err := h.prepareSocket(conn); err != nil {
				t.Fatalf("prepareSocket: %v", err)
			}
			rc, err := conn.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			_ = rc.Control(func(fd uintptr) {
				for _, o := range []struct {
					name           string
					level, opt, at int
				}{
					{"SO_RCVBUF", unix.SOL_SOCKET, unix.SO_RCVBUF, 1 << 16},
					{"SO_SNDBUF", unix.SOL_SOCKET, unix.SO_SNDBUF, 1 << 16},
					{"IP_RECVERR", unix.IPPROTO_IP, unix.IP_RECVERR, 1},
				} {
					if v, err := unix.GetsockoptInt(int(fd), o.level, o.opt); err != nil || v < o.at {
						t.Errorf("%s = %d, %v; want at least %d", o.name, v, err, o.at)
					}
				}
			})

			dead := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(freeUDPPort(t)))
			if _, err := conn.WriteToUDPAddrPort([]byte("probe"), dead); err != nil {
				t.Fatal(err)
			}
			_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 64)
			if _, _, _, _, err := conn.ReadMsgUDPAddrPort(buf, nil); !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("read after sending to a closed port: %v, want ECONNREFUSED", err)
			}
			var errs [4]udpio.ICMPError
			n, err := udpio.ReadErrQueue(conn, errs[:])
			if err != nil || n != 1 {
				t.Fatalf("error queue: %d entries, %v; want 1", n, err)
			}
			e := errs[0]
			if e.Dest != dead || e.Offender != dead.Addr() || icmpReason(e.Origin, e.Type, e.Code) != reasonPortUnreachable {
				t.Errorf("error queue entry %+v, want a port unreachable from %v", e, dead)
			}
			if n, err := udpio.ReadErrQueue(conn, errs[:]); n != 0 || err != nil {
				t.Errorf("drained queue: %d entries, %v", n, err)
			}
			_ = conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			if _, _, _, _, err := conn.ReadMsgUDPAddrPort(buf, nil); !isTimeout(err) {
				t.Errorf("read after draining: %v, want a timeout", err)
			}
		})
	}
}

func TestICMPReasons(t *testing.T) {
	for _, tc := range []struct {
		origin, typ, code uint8
		want              string
	}{
		{unix.SO_EE_ORIGIN_ICMP, 3, 3, reasonPortUnreachable},
		{unix.SO_EE_ORIGIN_ICMP, 3, 1, reasonHostUnreachable},
		{unix.SO_EE_ORIGIN_ICMP, 3, 13, reasonProhibited},
		{unix.SO_EE_ORIGIN_ICMP, 3, 4, ""},  // fragmentation needed
		{unix.SO_EE_ORIGIN_ICMP, 11, 0, ""}, // time exceeded
		{unix.SO_EE_ORIGIN_ICMP6, 1, 4, reasonPortUnreachable},
		{unix.SO_EE_ORIGIN_ICMP6, 2, 0, ""}, // packet too big
		{unix.SO_EE_ORIGIN_LOCAL, 0, 0, ""},
	} {
		if got := icmpReason(tc.origin, tc.typ, tc.code); got != tc.want {
			t.Errorf("origin %d type %d code %d: %q, want %q", tc.origin, tc.typ, tc.code, got, tc.want)
		}
	}
}

// A flow that a reload moves to a handler without passive checks keeps its
// socket, which still queues ICMP errors. An error queue left unread makes
// epoll report the socket for ever: the reply reactor must not spin on it.
func TestReloadDroppingPassiveChecksDrainsICMPErrors(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a := startUpstream(t, "a")
		withPassive := handlerConfig(per, "", a)
		withPassive["health_checks"] = map[string]any{"passive": map[string]any{"max_fails": 1000}}
		lb := startBalancerOn(t, network, false, 30*time.Second, withPassive)
		cl := newClient(t, lb.addr)
		cl.mustRoundTrip("before")

		if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, handlerConfig(per, "", a)), true); err != nil {
			t.Fatalf("reload: %v", err)
		}
		cl.mustRoundTrip("after the reload")
		a.close() // its port answers with ICMP port-unreachable
		for i := range 3 {
			if _, _, err := cl.roundTrip([]byte(fmt.Sprint("to a closed port ", i)), 100*time.Millisecond); !isTimeout(err) {
				t.Fatalf("round trip to a closed upstream: %v, want a timeout", err)
			}
		}
		start, wall := processCPU(t), time.Now()
		time.Sleep(time.Second)
		if used := processCPU(t) - start; used > time.Since(wall)/4 {
			t.Errorf("the idle balancer used %v of CPU in %v: the reply reactor spins on an unread error queue",
				used, time.Since(wall).Round(time.Millisecond))
		}
	})
}

// A reload that adds passive checks covers the flows it moves to the new
// handler: their sockets, opened by a handler without them, must report
// ICMP errors from then on.
func TestReloadAddingPassiveChecksCoversMovedFlows(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		tr := trackHandlers(t)
		a := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(per, "", a))
		cl := newClient(t, lb.addr)
		cl.mustRoundTrip("before")

		withPassive := handlerConfig(per, "", a)
		withPassive["health_checks"] = map[string]any{"passive": map[string]any{"max_fails": 1, "fail_duration": "10s"}}
		if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, withPassive), true); err != nil {
			t.Fatalf("reload: %v", err)
		}
		cl.mustRoundTrip("after the reload")
		u := tr.latest().Upstreams[0]
		a.close() // its port answers with ICMP port-unreachable
		for i := 0; u.healthy(); i++ {
			if i == 50 {
				t.Fatal("a closed upstream still up: the flow's socket reports no ICMP errors")
			}
			if _, err := cl.conn.Write([]byte(fmt.Sprint("to a closed port ", i))); err != nil {
				t.Fatal(err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}
