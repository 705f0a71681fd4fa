package stabilize

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
	"github.com/stabilize-lb/caddy-stabilize/internal/udpio"
)

// burstFlows is how many clients TestNewFlowBurst starts at once: as many
// as the open-file limit leaves room for (a client's socket and its flow's
// upstream-facing one each), up to 3,000. It skips the test where the
// sockets cannot have the buffers a burst needs: without CAP_NET_ADMIN,
// net.core.rmem_max caps them.
func burstFlows(t *testing.T) int {
	if os.Geteuid() != 0 {
		b, err := os.ReadFile("/proc/sys/net/core/rmem_max")
		if limit, _ := strconv.Atoi(strings.TrimSpace(string(b))); err != nil || limit < fastudp.SocketBuffer {
			t.Skipf("net.core.rmem_max %s caps the sockets' receive buffers (%v)", bytes.TrimSpace(b), err)
		}
	}
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	flows := min(3000, (int(lim.Cur)-openFDs(t)-200)/2)
	if flows < 1000 {
		t.Skipf("an open-file limit of %d leaves room for %d flows", lim.Cur, flows)
	}
	return flows
}

// TestNewFlowBurst: thousands of clients send their first datagram at
// once, to a listener that serves one flow already, and every one gets its
// reply without resending: no datagram is lost while the balancer sets the
// flows up. On fastudp/ the datagrams of new clients wait for caddy-l4 in
// the socket's queue (queue_full counts those it drops); on udp/ in the
// listener socket's receive buffer, which the listener's first flow grew
// (the kernel counts what it drops there). Neither drops any, nor does the
// handler. The upstream's socket is grown for the burst too.
func TestNewFlowBurst(t *testing.T) {
	flows := burstFlows(t)
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		up := startRawUpstream(t, true, false)
		udpio.GrowBuffers(up.conn, 8<<20)
		tr := trackHandlers(t)
		lb := startBalancerOn(t, network, false, 30*time.Second, rawHandler(per, up))
		if err := rawRoundTrip(newClient(t, lb.addr), []byte("first"), 2*time.Second); err != nil {
			t.Fatal(err)
		}
		h := tr.latest()
		socks := []netip.AddrPort{netip.MustParseAddrPort(lb.addr), up.addr}
		_, kernelBefore := udpQueues(t, socks)
		var queueFullBefore uint64
		if network == FastNetwork {
			queueFullBefore, _ = fastSocketAt(t, lb.addr).Drops()
		}

		raddr := net.UDPAddrFromAddrPort(socks[0])
		conns := make([]*net.UDPConn, flows)
		for i := range conns {
			c, err := net.DialUDP("udp", nil, raddr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.Close() })
			conns[i] = c
		}
		var wg sync.WaitGroup
		for g := range 2 {
			wg.Go(func() {
				for i := g; i < flows; i += 2 {
					if _, err := conns[i].Write(fmt.Appendf(nil, "burst-%d", i)); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()

		// A datagram dropped is never resent, so its client waits in
		// vain: the deadline only bounds a failing test. Each client
		// reads on its own, as a read past the deadline fails unread.
		deadline := time.Now().Add(10 * time.Second)
		var missing atomic.Int64
		for i, c := range conns {
			wg.Go(func() {
				_ = c.SetReadDeadline(deadline)
				buf := make([]byte, 64)
				n, err := c.Read(buf)
				if err != nil {
					missing.Add(1)
					return
				}
				if want := fmt.Appendf(nil, "burst-%d", i); !bytes.Equal(buf[:n], want) {
					t.Errorf("client %d got %q, want %q", i, buf[:n], want)
				}
			})
		}
		wg.Wait()
		_, kernel := udpQueues(t, socks)
		var queueFull uint64
		if network == FastNetwork {
			queueFull, _ = fastSocketAt(t, lb.addr).Drops()
		}
		handlerDrops := 0
		for reason, n := range h.Drops() {
			// per packet's unconnected sockets take any stranger's
			// datagram, which another process's late reply to a port
			// now theirs can be: no loss of a client's.
			if reason != dropUnknownSource.String() {
				handlerDrops += int(n)
			}
		}
		if missing.Load() > 0 || queueFull > queueFullBefore || kernel[0] > kernelBefore[0] || handlerDrops > 0 {
			t.Fatalf("%d of %d clients got no reply; dropped: %d as queue_full, %d by the kernel at the listener, %d at the upstream, by the handler %v",
				missing.Load(), flows, queueFull-queueFullBefore, kernel[0]-kernelBefore[0], kernel[1]-kernelBefore[1], h.Drops())
		}
	})
}

// TestListenerBuffers: once a flow has opened, the listener's socket has a
// fastudp socket's receive and send buffers, on udp/ too, where caddy-l4
// opened it with the system's default.
func TestListenerBuffers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("buffers past net.core.rmem_max need CAP_NET_ADMIN")
	}
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		a := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second, handlerConfig(PerFlow, "", a))
		cl := newClient(t, lb.addr)
		cl.mustRoundTrip("hello")
		rcv, snd := socketBuffers(t, flowOf(t, tr.latest(), cl).out)
		if rcv < fastudp.SocketBuffer || snd < fastudp.SocketBuffer {
			t.Fatalf("the listener's receive buffer is %d bytes, its send buffer %d; want %d", rcv, snd, fastudp.SocketBuffer)
		}
	})
}

// socketBuffers are the receive and send buffer sizes of c.
func socketBuffers(t *testing.T, c *net.UDPConn) (rcv, snd int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	_ = rc.Control(func(fd uintptr) {
		rcv, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
		snd, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF)
	})
	return rcv / 2, snd / 2 // the kernel reports twice the size
}
