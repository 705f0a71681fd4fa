package stabilize

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// TestQUICRoundRobin: 30 client connections over 3 quic/ backends are
// spread 10/10/10, each connection staying on its backend.
func TestQUICRoundRobin(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		bs := []*quicBackend{startQUICBackend(t, "a"), startQUICBackend(t, "b"), startQUICBackend(t, "c")}
		lb := startBalancerOn(t, network, false, 30*time.Second,
			quicHandler(t, "", "round_robin", nil, bs[0].dial(), bs[1].dial(), bs[2].dial()))
		got := map[string]int{}
		for i := range 30 {
			c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
			first := mustExchange(t, c, []byte(fmt.Sprint("hello ", i)))
			if again := mustExchange(t, c, []byte("again")); again != first {
				t.Fatalf("connection %d moved from %s to %s", i, first, again)
			}
			got[first]++
			_ = c.CloseWithError(0, "")
		}
		for _, b := range bs {
			if got[b.name] != 10 {
				t.Fatalf("connections per backend: %v, want 10 each", got)
			}
		}
	})
}

// TestQUICMaglevServerName: a maglev key's placeholders expand for a
// terminated connection: keyed by {l4.tls.server_name}, every connection
// for one name goes to one backend, and the names spread over them.
func TestQUICMaglevServerName(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		bs := []*quicBackend{startQUICBackend(t, "a"), startQUICBackend(t, "b"), startQUICBackend(t, "c")}
		h := quicHandler(t, "", "", nil, bs[0].dial(), bs[1].dial(), bs[2].dial())
		h["load_balancing"] = map[string]any{"selection": map[string]any{"policy": "maglev", "key": "{l4.tls.server_name}"}}
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		used := map[string]bool{}
		for i := range 12 {
			tlsConf := quicClientTLS(t)
			tlsConf.ServerName = fmt.Sprintf("name%d.test", i)
			tlsConf.InsecureSkipVerify = true // the test certificate is for localhost
			var first string
			for j := range 2 {
				c := dialQUIC(t, lb.addr, nil, tlsConf)
				name := mustExchange(t, c, []byte("hello"))
				_ = c.CloseWithError(0, "")
				if j == 0 {
					first = name
				} else if name != first {
					t.Fatalf("%s: to %s, then to %s", tlsConf.ServerName, first, name)
				}
			}
			used[first] = true
		}
		if len(used) < 2 {
			t.Fatalf("12 server names all went to %v", used)
		}
	})
}

// TestQUICUDPUpstreams: with udp/ upstreams each stream is one request
// datagram; per packet, 30 requests on one connection give exact thirds.
func TestQUICUDPUpstreams(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		us := []*testUpstream{startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")}
		lb := startBalancerOn(t, network, false, 30*time.Second,
			quicHandler(t, PerPacket, "round_robin", nil, us[0].dial(), us[1].dial(), us[2].dial()))
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		got := map[string]int{}
		for i := range 30 {
			got[mustExchange(t, c, []byte(fmt.Sprint("request ", i)))]++
		}
		for _, u := range us {
			if got[u.name] != 10 {
				t.Fatalf("requests per upstream: %v, want 10 each", got)
			}
		}
	})
}

// TestQUICRelaySizes relays bidirectional streams of 1 byte to 1 MiB both
// ways. The quic-go client sends with UDP GSO: on fastudp/ the socket reads
// its bursts coalesced (UDP GRO) and splits them for the transport.
func TestQUICRelaySizes(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		_, lb, c := startQUICRelay(t, network)
		for _, n := range []int{1, 100, 1200, 1500, 64 << 10, 1 << 20} {
			data := make([]byte, n)
			_, _ = rand.Read(data)
			if name := mustExchange(t, c, data); name != "a" {
				t.Fatalf("reply from %q", name)
			}
		}
		if network == FastNetwork && fastSocketAt(t, lb.addr).Coalesced() == 0 {
			t.Error("no datagram of the client's read coalesced: UDP GRO is off")
		}
	})
}

// TestQUICRelayUniStreams relays unidirectional streams opened by the
// client and by the backend, and a bidirectional stream the backend opens.
func TestQUICRelayUniStreams(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b, _, c := startQUICRelay(t, network)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, n := range []int{1, 5000, 300 << 10} {
			data := bytes.Repeat([]byte{'u'}, n)
			s, err := c.OpenUniStreamSync(ctx)
			if err != nil {
				t.Fatal(err)
			}
			_, _ = s.Write(data)
			_ = s.Close()
			r, err := c.AcceptUniStream(ctx)
			if err != nil {
				t.Fatalf("accepting the backend's uni stream: %v", err)
			}
			got, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(got, append([]byte("a|"), data...)) {
				t.Fatalf("uni stream of %d bytes: got %d bytes, %v", n, len(got), err)
			}
		}
		s, _ := c.OpenUniStreamSync(ctx)
		_, _ = s.Write([]byte("open bidi"))
		_ = s.Close()
		bs, err := c.AcceptStream(ctx)
		if err != nil {
			t.Fatalf("accepting the backend's bidi stream: %v", err)
		}
		got, err := io.ReadAll(bs)
		if err != nil || string(got) != "a|server bidi" {
			t.Fatalf("backend's bidi stream: %q, %v", got, err)
		}
		_, _ = bs.Write([]byte("ack"))
		_ = bs.Close()
		eventually(t, 5*time.Second, "the backend to see the ack", func() bool {
			_, _, acks, _ := b.snapshot()
			return slices.Equal(acks, []string{"ack"})
		})
	})
}

// TestQUICRelayDatagrams relays DATAGRAM frames both ways, to quic/ and to
// udp/ upstreams.
func TestQUICRelayDatagrams(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		for _, kind := range []string{"quic", "udp"} {
			t.Run(kind, func(t *testing.T) {
				var dial string
				if kind == "quic" {
					dial = startQUICBackend(t, "a").dial()
				} else {
					dial = startUpstream(t, "a").dial()
				}
				lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, dial))
				c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
				if !c.ConnectionState().SupportsDatagrams.Remote {
					t.Fatal("the balancer does not offer datagrams")
				}
				for i := range 5 {
					msg := fmt.Sprint("datagram ", i)
					if got := datagramExchange(t, c, msg); got != "a|"+msg {
						t.Fatalf("datagram %q: reply %q", msg, got)
					}
				}
			})
		}
	})
}

// TestQUICRelayStreamEnds passes RESET_STREAM and STOP_SENDING with their
// codes both ways, and the connection close code both ways.
func TestQUICRelayStreamEnds(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b, lb, c := startQUICRelay(t, network)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()

		// The client resets: the backend sees code 42 and resets its side
		// with 7, which the client sees.
		s, _ := c.OpenStreamSync(ctx)
		_, _ = s.Write([]byte("partial"))
		s.CancelWrite(42)
		_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadAll(s)
		var se *quic.StreamError
		if !errors.As(err, &se) || se.ErrorCode != 7 || !se.Remote {
			t.Fatalf("reading a reset stream: %v, want the backend's reset 7", err)
		}
		eventually(t, 5*time.Second, "the backend to see reset 42", func() bool {
			resets, _, _, _ := b.snapshot()
			return slices.Contains(resets, 42)
		})

		// The client stops reading: the backend's writes fail with 43.
		s, _ = c.OpenStreamSync(ctx)
		_, _ = s.Write([]byte("flood"))
		_ = s.Close()
		_, _ = io.ReadFull(s, make([]byte, 4096))
		s.CancelRead(43)
		eventually(t, 5*time.Second, "the backend to see STOP_SENDING 43", func() bool {
			_, stops, _, _ := b.snapshot()
			return slices.Contains(stops, 43)
		})

		// The client's close code reaches the backend.
		_ = c.CloseWithError(0x77, "client says bye")
		eventually(t, 5*time.Second, "the backend to see the client's close", func() bool {
			_, _, _, closes := b.snapshot()
			return slices.ContainsFunc(closes, func(s string) bool { return strings.Contains(s, "client says bye") })
		})

		// The backend's close code reaches the client.
		c = dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		_, err = quicExchange(c, []byte("die"))
		<-c.Context().Done()
		var ae *quic.ApplicationError
		if !errors.As(context.Cause(c.Context()), &ae) || ae.ErrorCode != 0x99 || ae.ErrorMessage != "backend says bye" {
			t.Fatalf("connection closed with %v, want the backend's 0x99", context.Cause(c.Context()))
		}
	})
}

// TestQUICRelayConcurrentStreams runs 100 streams at once on one
// connection.
func TestQUICRelayConcurrentStreams(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		_, _, c := startQUICRelay(t, network)
		var wg sync.WaitGroup
		errs := make(chan error, 100)
		for i := range 100 {
			wg.Go(func() {
				data := bytes.Repeat([]byte{byte(i)}, 10000+i)
				reply, err := quicExchange(c, data)
				if err == nil && !bytes.Equal(reply, append([]byte("a|"), data...)) {
					err = fmt.Errorf("stream %d: wrong reply of %d bytes", i, len(reply))
				}
				if err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	})
}

// TestQUICBackendDies: a backend that disappears without a close gets its
// clients a CONNECTION_CLOSE with QUICErrUpstreamGone, and a backend that
// is down gets new clients QUICErrNoUpstream, both counted.
func TestQUICBackendDies(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		b := startQUICBackend(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second,
			quicHandler(t, "", "", map[string]any{"max_idle_timeout": "1s"}, b.dial()))
		h := tr.latest()
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		mustExchange(t, c, []byte("hi"))
		// A stream in flight when the backend dies ends, never hangs.
		s, err := c.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		_, _ = s.Write([]byte("mid-stream"))
		eventually(t, 5*time.Second, "the stream at the backend", func() bool { return b.live.Load() == 1 })
		b.stop()
		_ = s.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadAll(s); err == nil || isTimeout(err) {
			t.Fatalf("a stream in flight when the backend died: %v, want the connection's close", err)
		}
		waitClosedWith(t, c, 10*time.Second, QUICErrUpstreamGone) // never a hang
		waitClosedWith(t, dialQUIC(t, lb.addr, nil, quicClientTLS(t)), 10*time.Second, QUICErrNoUpstream)
		if n := h.QUIC.stats.failed[quicFailDial].Load(); n != 1 {
			t.Fatalf("backend dial failures counted: %d, want 1", n)
		}
	})
}

// TestQUICUDPRequestFaults: a udp/ request without a reply within
// reply_timeout, and one longer than a datagram, reset the stream with
// their documented codes; the connection goes on.
func TestQUICUDPRequestFaults(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		u := startUpstream(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second,
			quicHandler(t, "", "", map[string]any{"reply_timeout": "200ms"}, u.dial()))
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		mustExchange(t, c, []byte("fine"))

		u.silent.Store(true)
		start := time.Now()
		_, err := quicExchange(c, []byte("unanswered"))
		var se *quic.StreamError
		if !errors.As(err, &se) || se.ErrorCode != QUICErrReplyTimeout {
			t.Fatalf("an unanswered request: %v, want reset %#x", err, QUICErrReplyTimeout)
		}
		if d := time.Since(start); d < 200*time.Millisecond || d > 3*time.Second {
			t.Fatalf("reset after %v, want about the 200ms reply_timeout", d)
		}
		u.silent.Store(false)

		_, err = quicExchange(c, make([]byte, maxUDPPayload+1))
		if !errors.As(err, &se) || se.ErrorCode != QUICErrRequestTooLarge {
			t.Fatalf("an oversized request: %v, want reset %#x", err, QUICErrRequestTooLarge)
		}
		if n := u.gotPayload(string(make([]byte, maxUDPPayload+1))); n != 0 {
			t.Fatal("the oversized request reached the upstream")
		}
		mustExchange(t, c, make([]byte, maxUDPPayload-100))
	})
}

// TestQUICActiveHealth: an active check of a quic/ upstream is a QUIC
// handshake with the configured ALPN: a backend without that ALPN, and a
// stopped one, are marked down and get no new connections.
func TestQUICActiveHealth(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, wrong, gone := startQUICBackend(t, "a"), startQUICBackend(t, "wrong", "other"), startQUICBackend(t, "gone")
		h := quicHandler(t, "", "round_robin", nil, a.dial(), wrong.dial(), gone.dial())
		h["health_checks"] = map[string]any{"active": map[string]any{"interval": "500ms", "timeout": "400ms"}}
		gone.stop()
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		eventually(t, 5*time.Second, "the two bad backends marked down", func() bool {
			return !hostOf(t, wrong.addr).Healthy() && !hostOf(t, gone.addr).Healthy() && hostOf(t, a.addr).Healthy()
		})
		for range 4 {
			c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
			if name := mustExchange(t, c, []byte("hi")); name != "a" {
				t.Fatalf("a connection went to %s", name)
			}
		}
		if n := wrong.conns.Load(); n != 0 {
			t.Fatalf("the backend without the ALPN completed %d handshakes", n)
		}
	})
}

// TestQUICNoLeak: once 1,000 relayed connections have closed (200 under
// the race detector, which makes handshakes about ten times slower) and
// their flows have idled out, the goroutines and the Go heap in use are
// back at their baseline, and no backend connection is open.
func TestQUICNoLeak(t *testing.T) {
	conns := 1000
	if raceEnabled {
		conns = 200
	}
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "a")
		lb := startBalancerOn(t, network, false, time.Second, quicHandler(t, "", "", nil, b.dial()))
		warm := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		mustExchange(t, warm, []byte("warm"))
		_ = warm.CloseWithError(0, "")
		time.Sleep(3 * time.Second) // the warm flow idles out
		base, baseHeap := runtime.NumGoroutine(), heapInuse()
		var next atomic.Int64
		errs := make(chan error, 4)
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for i := next.Add(1); i <= int64(conns); i = next.Add(1) {
					c, err := dialQUICErr(lb.addr, nil, quicClientTLS(t))
					if err == nil {
						_, err = quicExchange(c, []byte("x"))
						_ = c.CloseWithError(0, "")
					}
					if err != nil {
						errs <- fmt.Errorf("connection %d: %w", i, err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "the goroutines back at the baseline", func() bool {
			return runtime.NumGoroutine() <= base+5
		})
		// What stays: goroutine descriptors, which the runtime keeps for
		// reuse, grown maps and the like.
		const slack = 4 << 20
		if heap := heapInuse(); heap > baseHeap+slack {
			t.Fatalf("Go heap in use: %d kB, baseline %d kB", heap>>10, baseHeap>>10)
		}
		if n := b.live.Load(); n != 0 {
			t.Fatalf("%d backend connections still open", n)
		}
	})
}

// heapInuse is the Go heap in use after two garbage collections: the
// second frees what sync.Pools kept through the first.
func heapInuse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// TestQUICPassiveDialFailure: a backend dial that fails counts as a passive
// failure, which marks the upstream down: new connections go elsewhere.
func TestQUICPassiveDialFailure(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		down, up := startQUICBackend(t, "down"), startQUICBackend(t, "up")
		down.stop()
		h := quicHandler(t, "", "round_robin", nil, down.dial(), up.dial())
		h["health_checks"] = map[string]any{"passive": map[string]any{"max_fails": 1, "fail_duration": "1m"}}
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		<-c.Context().Done() // the first pick: the down backend
		eventually(t, 5*time.Second, "the down backend marked down", func() bool { return !hostOf(t, down.addr).Healthy() })
		for range 3 {
			c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
			if name := mustExchange(t, c, []byte("hi")); name != "up" {
				t.Fatalf("a connection went to %s", name)
			}
		}
	})
}

// TestQUICClientAbortIsNoDialFailure: a client that closes its connection
// while the backend dial is under way ends that dial, which says nothing
// about the upstream: it is no passive failure.
func TestQUICClientAbortIsNoDialFailure(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "a")
		slow, dialing := startSlowUDPProxy(t, b.addr, 300*time.Millisecond)
		h := quicHandler(t, "", "", nil, "quic/"+slow.String())
		h["health_checks"] = map[string]any{"passive": map[string]any{"max_fails": 1, "fail_duration": "1m"}}
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		eventually(t, 5*time.Second, "the backend dial", func() bool { return dialing.Load() > 0 })
		_ = c.CloseWithError(0, "") // before the backend leg can be up
		time.Sleep(time.Second)
		if !hostOf(t, slow).Healthy() {
			t.Fatal("a client's abort marked its upstream down")
		}
		if name := mustExchange(t, dialQUIC(t, lb.addr, nil, quicClientTLS(t)), []byte("hi")); name != "a" {
			t.Fatalf("relayed to %s", name)
		}
	})
}

// startSlowUDPProxy relays datagrams between to and one peer, each after
// delay. It returns its address and the count of the peer's datagrams.
func startSlowUDPProxy(t *testing.T, to netip.AddrPort, delay time.Duration) (netip.AddrPort, *atomic.Int64) {
	t.Helper()
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	got := new(atomic.Int64)
	go func() {
		var peer netip.AddrPort
		buf := make([]byte, 65535)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			dst := to
			if from == to {
				dst = peer
			} else {
				peer = from
				got.Add(1)
			}
			b := bytes.Clone(buf[:n])
			time.AfterFunc(delay, func() { _, _ = conn.WriteToUDPAddrPort(b, dst) })
		}
	}()
	return conn.LocalAddr().(*net.UDPAddr).AddrPort(), got
}

// TestQUICRelayKeepsStreamIDs: a client stream has the same ID on the
// backend leg, whatever order the streams' first bytes arrive in, as
// HTTP/3 datagrams and WebTransport sessions name streams by ID.
func TestQUICRelayKeepsStreamIDs(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		_, _, c := startQUICRelay(t, network)
		var streams []*quic.Stream
		for range 32 {
			s, err := c.OpenStreamSync(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			streams = append(streams, s)
		}
		for _, s := range slices.Backward(streams) { // the last opened speaks first
			if _, err := s.Write([]byte("stream id")); err != nil {
				t.Fatal(err)
			}
			_ = s.Close()
		}
		for _, s := range streams {
			_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
			got, err := io.ReadAll(s)
			if err != nil {
				t.Fatalf("stream %d: %v", s.StreamID(), err)
			}
			if want := fmt.Sprint(int64(s.StreamID())); string(got) != want {
				t.Fatalf("client stream %s is backend stream %s", want, got)
			}
		}
	})
}

// TestQUICClientKeepAlive: a client that keeps its idle connection alive
// with PINGs keeps its relayed connection, whose backend leg the relay
// keeps alive, longer than max_idle_timeout.
func TestQUICClientKeepAlive(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b := startQUICBackend(t, "a")
		lb := startBalancerOn(t, network, false, 30*time.Second,
			quicHandler(t, "", "", map[string]any{"max_idle_timeout": "1s"}, b.dial()))
		c := dialQUIC(t, lb.addr, &quic.Config{EnableDatagrams: true, KeepAlivePeriod: 300 * time.Millisecond}, quicClientTLS(t))
		mustExchange(t, c, []byte("hi"))
		select {
		case <-c.Context().Done():
			t.Fatalf("a client sending keep-alives lost its idle connection: %v", context.Cause(c.Context()))
		case <-time.After(4 * time.Second):
		}
		if name := mustExchange(t, c, []byte("still there")); name != "a" {
			t.Fatalf("reply from %s", name)
		}
		if n := b.conns.Load(); n != 1 {
			t.Fatalf("the backend accepted %d connections, want 1", n)
		}
	})
}

// TestQUICStopSendingIdleBackend: a client's STOP_SENDING reaches a
// backend that is not writing, but waits on its stream's send side.
func TestQUICStopSendingIdleBackend(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		b, _, c := startQUICRelay(t, network)
		s, err := c.OpenStreamSync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		_, _ = s.Write([]byte("wait stop"))
		_ = s.Close()
		time.Sleep(200 * time.Millisecond) // the request reaches the backend
		s.CancelRead(44)
		eventually(t, 5*time.Second, "the backend to see STOP_SENDING 44", func() bool {
			_, stops, _, _ := b.snapshot()
			return slices.Contains(stops, 44)
		})
	})
}

// TestQUICIdleStreamMemory: the heap that a client pins with ~200 open,
// nearly empty streams per connection stays small: a udp/ request buffer
// grows with its data, and a relayed stream waiting to read holds a small
// buffer. Heap in use per connection, client and both legs included, in
// this process.
func TestQUICIdleStreamMemory(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		for _, kind := range []string{"quic", "udp"} {
			t.Run(kind, func(t *testing.T) {
				// Measured: about 2.3 MiB with quic/ (four QUIC
				// endpoints' stream state), 0.7 MiB with udp/; 11 and
				// 13 MiB when each stream held 32 or 64 KiB.
				var h map[string]any
				limit := uint64(4 << 20)
				if kind == "quic" {
					h = quicHandler(t, "", "", nil, startQUICBackend(t, "a").dial())
				} else {
					h = quicHandler(t, "", "", nil, startUpstream(t, "a").dial())
					limit = 2 << 20
				}
				lb := startBalancerOn(t, network, false, 30*time.Second, h)
				const conns, streams = 5, 99
				base := heapInuse()
				for range conns {
					c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
					mustExchange(t, c, []byte("warm"))
					for range streams {
						s, err := c.OpenStreamSync(context.Background())
						if err != nil {
							t.Fatal(err)
						}
						_, _ = s.Write([]byte("x"))
						u, err := c.OpenUniStreamSync(context.Background())
						if err != nil {
							t.Fatal(err)
						}
						_, _ = u.Write([]byte("x"))
					}
				}
				time.Sleep(time.Second) // every stream relayed
				per := (heapInuse() - base) / conns
				t.Logf("%s: %d KiB of heap per connection with %d open 1-byte streams", kind, per>>10, 2*streams)
				if per > limit {
					t.Fatalf("%d KiB of heap per connection with %d idle streams, want at most %d KiB", per>>10, 2*streams, limit>>10)
				}
			})
		}
	})
}
