package fastudp

import (
	"fmt"
	"net"
	"slices"
	"sync"
	"testing"
	"time"
)

// recorder is a BatchEndpoint and Warmer that records what it gets, and
// how.
type recorder struct {
	mu      sync.Mutex
	got     []string
	calls   []int // datagrams per call
	warms   int   // Warm calls before the latest delivery
	hold    chan struct{}
	holding bool
}

func (r *recorder) Deliver(d Datagram, _ int64) {
	r.DeliverBatch([]Datagram{d}, 0)
}

func (r *recorder) Warm() {
	r.mu.Lock()
	r.warms++
	r.mu.Unlock()
}

func (r *recorder) DeliverBatch(ds []Datagram, _ int64) {
	r.mu.Lock()
	if r.warms < len(r.got)+len(ds) {
		r.calls = append(r.calls, -1) // delivered before Warm: fails the test
	}
	for _, d := range ds {
		r.got = append(r.got, string(d.B))
	}
	r.calls = append(r.calls, len(ds))
	hold := r.holding
	r.holding = false
	r.mu.Unlock()
	if hold {
		<-r.hold
	}
}

func (r *recorder) Expired(int64) bool { return false }
func (r *recorder) Close()             {}

func (r *recorder) snapshot() ([]string, []int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got), slices.Clone(r.calls)
}

// A read batch's datagrams of one endpoint reach it in one DeliverBatch, in
// their order, while datagrams of other endpoints interleave with them;
// the endpoint is warmed for each datagram before it is delivered.
func TestDeliverBatch(t *testing.T) {
	f, err := Listen("127.0.0.1:0", 1)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := f.Socket()
	to := s.Conn().LocalAddr().(*net.UDPAddr)
	var clients [2]*net.UDPConn
	var eps [2]*recorder
	for i := range clients {
		c, err := net.DialUDP("udp", nil, to)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients[i] = c
		// The first datagram holds the socket's reader while the others
		// queue up, so that they are read in one batch.
		eps[i] = &recorder{hold: make(chan struct{}), holding: i == 0}
		s.Register(c.LocalAddr().(*net.UDPAddr).AddrPort(), eps[i])
	}
	if _, err := clients[0].Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { got, _ := eps[0].snapshot(); return len(got) == 1 })
	const n = 10
	for i := range n {
		for c, conn := range clients {
			if _, err := conn.Write(fmt.Appendf(nil, "%d-%d", c, i)); err != nil {
				t.Fatal(err)
			}
		}
	}
	time.Sleep(50 * time.Millisecond) // let them all arrive
	close(eps[0].hold)
	for c, ep := range eps {
		waitFor(t, func() bool { got, _ := ep.snapshot(); return len(got) >= n })
		got, calls := ep.snapshot()
		var want []string
		if c == 0 {
			want = append(want, "first")
		}
		for i := range n {
			want = append(want, fmt.Sprintf("%d-%d", c, i))
		}
		if !slices.Equal(got, want) {
			t.Errorf("endpoint %d got %q, want %q", c, got, want)
		}
		if slices.Contains(calls, -1) {
			t.Errorf("endpoint %d got datagrams before Warm: %v", c, calls)
		}
		if last := calls[len(calls)-1]; last != n {
			t.Errorf("endpoint %d got its batch in calls of %v datagrams, want the last of %d", c, calls, n)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
	}
}

// With several readers, each client's datagrams reach its endpoint, in
// order, whichever socket the kernel picks for it; and so they do after a
// later config adds readers or takes them away.
func TestReaders(t *testing.T) {
	const key = "127.0.0.1:0"
	f, err := Listen(key, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := f.Socket()
	to := s.Conn().LocalAddr().(*net.UDPAddr)
	const clients, n = 40, 20
	eps := make([]*recorder, clients)
	conns := make([]*net.UDPConn, clients)
	for i := range clients {
		c, err := net.DialUDP("udp", nil, to)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
		eps[i] = &recorder{}
		s.Register(c.LocalAddr().(*net.UDPAddr).AddrPort(), eps[i])
	}
	sent := 0
	for _, readers := range []int{2, 3, 1} {
		g, err := Listen(key, readers) // the next config's
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		if g.Socket() != s {
			t.Fatal("a second Listen of the address opened another socket")
		}
		if got := s.Readers(); got != readers {
			t.Fatalf("%d readers, want %d", got, readers)
		}
		for j := sent; j < sent+n; j++ {
			for i, c := range conns {
				if _, err := c.Write(fmt.Appendf(nil, "%d-%d", i, j)); err != nil {
					t.Fatal(err)
				}
			}
		}
		sent += n
		for i, ep := range eps {
			waitFor(t, func() bool { got, _ := ep.snapshot(); return len(got) >= sent })
			got, _ := ep.snapshot()
			for j := range sent {
				if want := fmt.Sprintf("%d-%d", i, j); got[j] != want {
					t.Fatalf("%d readers: client %d: datagram %d is %q, want %q (all: %q)", readers, i, j, got[j], want, got)
				}
			}
		}
	}
	// Another socket with SO_REUSEPORT may bind the port too, but a
	// plain socket may not.
	if c, err := net.ListenUDP("udp", to); err == nil {
		c.Close()
		t.Error("a socket without SO_REUSEPORT could bind the readers' port")
	}
}

// A reader count out of range, which the stabilize app refuses, is only
// clamped; a closed front's socket goes back to the readers of its newest
// open front.
func TestReadersClampedAndRestored(t *testing.T) {
	for n, want := range map[int]int{0: 1, -1: 1, MaxReaders + 1: MaxReaders} {
		f, err := Listen("127.0.0.1:0", n)
		if err != nil {
			t.Fatalf("%d readers: %v", n, err)
		}
		if got := f.Socket().Readers(); got != want {
			t.Errorf("%d readers: the socket has %d, want %d", n, got, want)
		}
		f.Close()
	}
	running, err := Listen("127.0.0.1:0", 2)
	if err != nil {
		t.Fatal(err)
	}
	defer running.Close()
	s := running.Socket()
	failed, err := Listen(s.Key(), 4)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Readers(); got != 4 {
		t.Fatalf("%d readers, want the newest front's 4", got)
	}
	failed.Close()
	if got := s.Readers(); got != 2 {
		t.Fatalf("%d readers after the newest front closed, want the remaining one's 2", got)
	}
}
