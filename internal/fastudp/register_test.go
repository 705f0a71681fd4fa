package fastudp

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// coldEndpoint is an endpoint of about a stabilize Flow's size whose
// Expired reads its own memory, as a Flow's does: with many of them, the
// reaper's walk misses the CPU's cache on each.
type coldEndpoint struct {
	_    [448]byte
	last atomic.Int64
}

func (*coldEndpoint) Deliver(Datagram, int64)  {}
func (e *coldEndpoint) Expired(now int64) bool { return now-e.last.Load() > int64(time.Hour) }
func (*coldEndpoint) Close()                   {}

// clientAddr is the i-th of distinct client addresses.
func clientAddr(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), uint16(1024+i>>24))
}

// maxInt64 raises m to v.
func maxInt64(m *atomic.Int64, v int64) {
	for {
		old := m.Load()
		if v <= old || m.CompareAndSwap(old, v) {
			return
		}
	}
}

// mutexWait is the total time goroutines have spent blocked on sync
// mutexes, read-write ones included.
func mutexWait() time.Duration {
	m := []metrics.Sample{{Name: "/sync/mutex/wait/total:seconds"}}
	metrics.Read(m)
	return time.Duration(m[0].Value.Float64() * 1e9)
}

// listenLocal opens a socket with one reader on a free port of 127.0.0.1,
// closed at the end of the test.
func listenLocal(tb testing.TB) (*Front, *Socket) {
	tb.Helper()
	f, err := Listen("127.0.0.1:0", 1)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = f.Close() })
	return f, f.Socket()
}

// countingEndpoint counts its datagrams; it expires when told to, and
// then its Close unregisters it.
type countingEndpoint struct {
	s       *Socket
	client  netip.AddrPort
	got     atomic.Int64
	expired atomic.Bool
	closed  atomic.Bool
}

func (e *countingEndpoint) Deliver(Datagram, int64) { e.got.Add(1) }
func (e *countingEndpoint) Expired(int64) bool      { return e.expired.Load() }
func (e *countingEndpoint) Close() {
	e.closed.Store(true)
	e.s.Unregister(e.client, e)
}

// TestSocketEndpointTable: the datagrams of each of many clients, spread
// over the table's shards, reach the client's endpoint while other clients
// register and unregister; an unregistered client's reach the front; the
// reaper closes the expired endpoints of every shard, and only those.
func TestSocketEndpointTable(t *testing.T) {
	f, s := listenLocal(t)
	to := s.Conn().LocalAddr().(*net.UDPAddr)
	const n = 200
	conns := make([]*net.UDPConn, n)
	eps := make([]*countingEndpoint, n)
	for i := range conns {
		c, err := net.DialUDP("udp", nil, to)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
		eps[i] = &countingEndpoint{s: s, client: c.LocalAddr().(*net.UDPAddr).AddrPort()}
		s.Register(eps[i].client, eps[i])
	}
	if got := s.Endpoints(); got != n {
		t.Fatalf("%d endpoints, want %d", got, n)
	}
	stop := make(chan struct{})
	var churn sync.WaitGroup
	churn.Go(func() { // other clients come and go meanwhile
		ep := new(coldEndpoint)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			s.Register(clientAddr(i), ep)
			s.Unregister(clientAddr(i), ep)
		}
	})
	for i, c := range conns {
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	poll(t, 2*time.Second, "a datagram of each client", func() bool {
		for _, ep := range eps {
			if ep.got.Load() == 0 {
				return false
			}
		}
		return true
	})
	close(stop)
	churn.Wait()
	for i, ep := range eps {
		if got := ep.got.Load(); got != 1 {
			t.Errorf("endpoint %d got %d datagrams, want 1", i, got)
		}
	}

	// The first client unregistered: its datagram goes to the front.
	s.Unregister(eps[0].client, eps[0])
	if _, err := conns[0].Write([]byte("front")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	nr, from, err := f.ReadFrom(buf)
	if err != nil || string(buf[:nr]) != "front" || from.(*net.UDPAddr).AddrPort() != eps[0].client {
		t.Fatalf("the front read %q from %v (%v), want the unregistered client's", buf[:nr], from, err)
	}

	// Every other endpoint of the second half expires: the reaper closes
	// those, whatever their shard.
	for i := n / 2; i < n; i += 2 {
		eps[i].expired.Store(true)
	}
	poll(t, 3*reapInterval, "the reaper's closing of the expired endpoints", func() bool { return s.Endpoints() == n-1-n/4 })
	for i, ep := range eps[1:] {
		if want := ep.expired.Load(); ep.closed.Load() != want {
			t.Errorf("endpoint %d: closed %v, expired %v", i+1, ep.closed.Load(), want)
		}
	}
}

// poll waits up to within for cond, or fails the test for want of what.
func poll(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(within); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, within)
		}
	}
}

// BenchmarkSocketRegister registers and unregisters new clients, from one
// goroutine, and from many at once as a flood of new clients does
// (caddy-l4 starts a Handle per new client, and each registers its flow),
// on a socket that holds `held` endpoints, which its reaper walks once a
// second; run it for a few seconds so that the reaper walks during it.
// The garbage collector is off while it runs, so that its pauses do not
// hide the locks' waits. wait-ns/op is the time goroutines spent blocked
// on locks per Register and Unregister pair, max-µs the longest Register,
// and stalled-ms/s the time per second of the run spent in Registers that
// took over 100 µs.
func BenchmarkSocketRegister(b *testing.B) {
	for _, c := range []struct {
		held  int
		flood bool
	}{{0, false}, {100_000, false}, {300_000, false}, {0, true}, {100_000, true}} {
		b.Run(fmt.Sprintf("held=%d/flood=%v", c.held, c.flood), func(b *testing.B) {
			benchmarkRegister(b, c.held, c.flood)
		})
	}
}

func benchmarkRegister(b *testing.B, held int, flood bool) {
	_, s := listenLocal(b)
	eps := make([]coldEndpoint, held)
	now := time.Now().UnixNano()
	for i := range eps {
		eps[i].last.Store(now)
		s.Register(clientAddr(i), &eps[i])
	}
	var next, worst, stalled atomic.Int64
	next.Store(int64(held))
	run := func(more func() bool) {
		ep := new(coldEndpoint)
		ep.last.Store(now)
		for more() {
			c := clientAddr(int(next.Add(1)))
			t0 := time.Now()
			s.Register(c, ep)
			d := int64(time.Since(t0))
			maxInt64(&worst, d)
			if d > int64(100*time.Microsecond) {
				stalled.Add(d)
			}
			s.Unregister(c, ep)
		}
	}
	runtime.GC()
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	waited := mutexWait()
	b.ResetTimer()
	if flood {
		b.SetParallelism(32)
		b.RunParallel(func(pb *testing.PB) { run(pb.Next) })
	} else {
		i := 0
		run(func() bool { i++; return i <= b.N })
	}
	b.StopTimer()
	b.ReportMetric(float64(mutexWait()-waited)/float64(b.N), "wait-ns/op")
	b.ReportMetric(float64(worst.Load())/1e3, "max-µs")
	b.ReportMetric(float64(stalled.Load())/1e6/b.Elapsed().Seconds(), "stalled-ms/s")
	if n := s.Endpoints(); n != held {
		b.Fatalf("%d endpoints left, want %d", n, held)
	}
}

// BenchmarkSocketEndpoint is a reader's lookup of a datagram's endpoint,
// among 100,000.
func BenchmarkSocketEndpoint(b *testing.B) {
	_, s := listenLocal(b)
	const held = 100_000
	eps := make([]coldEndpoint, held)
	for i := range eps {
		s.Register(clientAddr(i), &eps[i])
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if s.endpoint(clientAddr(i)) == nil {
			b.Fatal("no endpoint")
		}
		if i++; i == held {
			i = 0
		}
	}
}
