package fastudp

import (
	"bytes"
	"encoding/binary"
	"math"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestNewClientQueueBounds: while no one reads the front, datagrams of
// unregistered clients queue up to the count bound if small, or up to the
// byte budget, which their size classes' buffers fill, if large; the rest
// are dropped and counted as queue_full. The queued ones then reach the
// front whole, in order, from their client.
func TestNewClientQueueBounds(t *testing.T) {
	for _, tc := range []struct {
		name       string
		size, sent int
		want       int // queued
	}{
		{"small", 32, newClientQueue + 600, newClientQueue},
		{"1000-byte", 1000, 5000, newClientBytes / 1024},
		{"8000-byte", 8000, 1000, newClientBytes / BufferSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, s := listenLocal(t)
			c, err := net.DialUDP("udp", nil, f.LocalAddr().(*net.UDPAddr))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			client := c.LocalAddr().(*net.UDPAddr).AddrPort()
			b := make([]byte, tc.size)
			// In rounds of at most 64 KiB, each taken in by the socket
			// before the next, so that the kernel's receive buffer never
			// overflows, even at a default net.core.rmem_max.
			round := max(1, 64<<10/tc.size)
			for sent := 0; sent < tc.sent; {
				for end := min(sent+round, tc.sent); sent < end; sent++ {
					binary.BigEndian.PutUint32(b, uint32(sent))
					if _, err := c.Write(b); err != nil {
						t.Fatal(err)
					}
				}
				deadline := time.Now().Add(5 * time.Second)
				for {
					full, _ := s.Drops()
					if f.waiting()+int(full) == sent {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("after %d sent: %d queued, %d dropped", sent, f.waiting(), full)
					}
					time.Sleep(time.Millisecond)
				}
			}
			full, _ := s.Drops()
			if f.waiting() != tc.want || int(full) != tc.sent-tc.want {
				t.Fatalf("%d queued and %d dropped as queue_full, want %d and %d", f.waiting(), full, tc.want, tc.sent-tc.want)
			}
			buf := make([]byte, BufferSize)
			for i := range tc.want {
				n, from, err := f.ReadFrom(buf)
				if err != nil {
					t.Fatal(err)
				}
				binary.BigEndian.PutUint32(b, uint32(i))
				if !bytes.Equal(buf[:n], b) || from.(*net.UDPAddr).AddrPort() != client {
					t.Fatalf("datagram %d: %d bytes numbered %d from %v", i, n, binary.BigEndian.Uint32(buf[:4]), from)
				}
			}
			if q := f.queuedBytes.Load(); q != 0 {
				t.Fatalf("%d bytes counted as queued with the queue empty", q)
			}
		})
	}
}

// TestNewClientQueueAllocs: a datagram of an unregistered client dropped
// past the budget allocates nothing, so that a flood makes no garbage; one
// queued and read allocates only the address caddy-l4 keeps.
func TestNewClientQueueAllocs(t *testing.T) {
	f, s := listenLocal(t)
	src := netip.MustParseAddrPort("127.0.0.1:1234")
	data := make([]byte, 100)
	buf := make([]byte, BufferSize)
	if n := testing.AllocsPerRun(1000, func() {
		s.toCaddy(src, data, netip.Addr{})
		if _, _, err := f.ReadFrom(buf); err != nil {
			t.Fatal(err)
		}
	}); n > 1 {
		t.Errorf("a datagram queued and read: %v allocations, want at most 1", n)
	}
	f.queuedBytes.Store(newClientBytes) // as if full
	full, _ := s.Drops()
	if n := testing.AllocsPerRun(1000, func() { s.toCaddy(src, data, netip.Addr{}) }); n != 0 {
		t.Errorf("a datagram dropped: %v allocations, want 0", n)
	}
	if now, _ := s.Drops(); now-full != 1001 {
		t.Errorf("%d dropped as queue_full, want 1001", now-full)
	}
	if f.waiting() != 0 {
		t.Errorf("%d queued past the budget", f.waiting())
	}
}

// TestQueuedClass: each size has the smallest class that holds it.
func TestQueuedClass(t *testing.T) {
	for _, tc := range []struct{ n, size int }{
		{0, 64}, {1, 64}, {64, 64}, {65, 128}, {256, 256}, {257, 512},
		{1500, 2048}, {4096, 4096}, {4097, BufferSize}, {BufferSize, BufferSize},
	} {
		if got := queuedSizes[queuedClass(tc.n)]; got != int64(tc.size) {
			t.Errorf("%d bytes: class of %d, want %d", tc.n, got, tc.size)
		}
	}
}

// TestQueuedOutliveTheirFront: datagrams of new clients still queued when
// their front closes move to the socket's newest open front, within its
// bounds, ahead of that front's own, which are newer: at a reload, from the
// old config's front to the new one's; when a config fails to start, from
// its front back to the running one's. The last front's are counted as
// queue_full. No bytes stay counted.
func TestQueuedOutliveTheirFront(t *testing.T) {
	queue := func(s *Socket, from uint16, n int) {
		for i := range n {
			s.toCaddy(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), from+uint16(i)), make([]byte, 100), netip.Addr{})
		}
	}
	// twoFronts opens a front, queues 3 datagrams for it (ports 1000 on),
	// opens a second front of its socket and queues n for that (ports
	// from second on).
	twoFronts := func(t *testing.T, second uint16, n int) (*Front, *Front) {
		first, s := listenLocal(t)
		queue(s, 1000, 3)
		f, err := Listen(s.Key(), 1)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = f.Close() })
		queue(s, second, n)
		return first, f
	}
	// drain reads f's datagrams, which must be from ports, in order.
	drain := func(t *testing.T, f *Front, ports ...uint16) {
		t.Helper()
		if f.waiting() != len(ports) {
			t.Fatalf("%d queued, want %d", f.waiting(), len(ports))
		}
		buf := make([]byte, BufferSize)
		for _, port := range ports {
			n, from, err := f.ReadFrom(buf)
			if err != nil || n != 100 || from.(*net.UDPAddr).Port != int(port) {
				t.Fatalf("read %d bytes from %v, %v; want 100 from port %d", n, from, err, port)
			}
		}
		if q := f.queuedBytes.Load(); q != 0 {
			t.Fatalf("%d bytes counted as queued with the queue empty", q)
		}
	}
	t.Run("reload", func(t *testing.T) {
		old, next := twoFronts(t, 2000, 2)
		if err := old.Close(); err != nil {
			t.Fatal(err)
		}
		drain(t, next, 1000, 1001, 1002, 2000, 2001)
	})
	t.Run("failed config", func(t *testing.T) {
		running, failed := twoFronts(t, 2000, 2)
		if err := failed.Close(); err != nil {
			t.Fatal(err)
		}
		drain(t, running, 1000, 1001, 1002, 2000, 2001)
	})
	t.Run("within bounds", func(t *testing.T) {
		old, next := twoFronts(t, 0, newClientQueue-1)
		full, _ := old.Socket().Drops()
		if err := old.Close(); err != nil {
			t.Fatal(err)
		}
		if now, _ := next.Socket().Drops(); now-full != 2 || next.waiting() != newClientQueue {
			t.Fatalf("%d queued, %d counted as queue_full; want %d and 2", next.waiting(), now-full, newClientQueue)
		}
		if q, want := next.queuedBytes.Load(), int64(newClientQueue)*queuedSizes[queuedClass(100)]; q != want {
			t.Fatalf("%d bytes counted as queued, want %d", q, want)
		}
	})
	t.Run("last front", func(t *testing.T) {
		f, s := listenLocal(t)
		queue(s, 1000, 3)
		full, _ := s.Drops()
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		if now, _ := s.Drops(); now-full != 3 {
			t.Fatalf("%d counted as queue_full, want 3", now-full)
		}
	})
}

// TestIdleFrontSmall: a front costs little memory until new clients queue
// on it, as a listener port range opens one per port and a reload holds
// two configs' at once; its queue grows with a burst.
func TestIdleFrontSmall(t *testing.T) {
	_, s := listenLocal(t)
	const n = 100
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	fronts := make([]*Front, 0, n)
	for range n {
		f, err := Listen(s.Key(), 1)
		if err != nil {
			t.Fatal(err)
		}
		fronts = append(fronts, f)
	}
	runtime.ReadMemStats(&after)
	for _, f := range fronts {
		_ = f.Close()
	}
	if per := (after.TotalAlloc - before.TotalAlloc) / n; per > 4<<10 {
		t.Errorf("a front allocates %d bytes, want at most 4 KiB", per)
	}
}

// waiting is the number of datagrams queued on f.
func (f *Front) waiting() int {
	f.qmu.Lock()
	defer f.qmu.Unlock()
	return len(f.queue) - f.head
}

// TestNewClientQueueBacklogAmortized: with a backlog that caddy-l4 reads
// as fast as new datagrams come, queueing one does not move the whole
// queue down each time (a copy of up to newClientQueue pointers under
// s.mu, which every reader of the socket waits for).
func TestNewClientQueueBacklogAmortized(t *testing.T) {
	f, s := listenLocal(t)
	src := netip.MustParseAddrPort("127.0.0.1:1234")
	data := make([]byte, 32)
	buf := make([]byte, BufferSize)
	for f.qlen() < 1000 || f.qlen() < f.qcap() { // a backlog that fills its slice
		s.toCaddy(src, data, netip.Addr{})
	}
	if _, _, err := f.ReadFrom(buf); err != nil {
		t.Fatal(err)
	}
	const rounds = 1000
	moves := 0
	for range rounds {
		f.qmu.Lock()
		before := f.head
		f.qmu.Unlock()
		s.toCaddy(src, data, netip.Addr{})
		f.qmu.Lock()
		if before > 0 && f.head == 0 {
			moves++
		}
		f.qmu.Unlock()
		if _, _, err := f.ReadFrom(buf); err != nil {
			t.Fatal(err)
		}
	}
	if moves > 2 {
		t.Errorf("the queue moved down %d times in %d datagrams queued and read, want at most 2", moves, rounds)
	}
}

// qlen and qcap are the length and capacity of f's queue slice.
func (f *Front) qlen() int { f.qmu.Lock(); defer f.qmu.Unlock(); return len(f.queue) }
func (f *Front) qcap() int { f.qmu.Lock(); defer f.qmu.Unlock(); return cap(f.queue) }

// TestNewClientQueueReload: while the socket's readers queue new clients'
// datagrams and caddy-l4 reads them, a reload opens a second front and
// closes the first: every datagram is read once or counted as queue_full,
// none waits unread, and no byte stays counted.
func TestNewClientQueueReload(t *testing.T) {
	old, s := listenLocal(t)
	const senders, each = 4, 3000
	full0, _ := s.Drops()
	var seen sync.Map
	var reads atomic.Int64
	var dup atomic.Bool
	// read reads f until it closes, or at most limit datagrams.
	read := func(f *Front, limit int, done chan<- struct{}) {
		defer close(done)
		buf := make([]byte, BufferSize)
		for range limit {
			n, _, err := f.ReadFrom(buf)
			if err != nil {
				return
			}
			if _, loaded := seen.LoadOrStore(binary.BigEndian.Uint32(buf[:n]), true); loaded {
				dup.Store(true)
			}
			reads.Add(1)
		}
	}
	// The old config's server stops reading after 500, so that its
	// front has a backlog when it closes.
	oldDone := make(chan struct{})
	go read(old, 500, oldDone)
	var wg sync.WaitGroup
	for g := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			src := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(1000+g))
			b := make([]byte, 64)
			for i := range each {
				binary.BigEndian.PutUint32(b, uint32(g*each+i))
				s.toCaddy(src, b, netip.Addr{})
				if i%128 == 0 {
					runtime.Gosched()
				}
			}
		}()
	}
	<-oldDone
	for deadline := time.Now().Add(5 * time.Second); old.waiting() < 1000 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	next, err := Listen(s.Key(), 1)
	if err != nil {
		t.Fatal(err)
	}
	nextDone := make(chan struct{})
	go read(next, math.MaxInt, nextDone)
	time.Sleep(time.Millisecond)
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for deadline := time.Now().Add(5 * time.Second); next.waiting() > 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d datagrams wait unread", next.waiting())
		}
	}
	_ = next.Close()
	<-nextDone
	full, _ := s.Drops()
	if got := reads.Load() + int64(full-full0); got != senders*each || dup.Load() {
		t.Errorf("%d read and %d dropped of %d sent (a datagram read twice: %v)", reads.Load(), full-full0, senders*each, dup.Load())
	}
	for _, f := range []*Front{old, next} {
		if q := f.queuedBytes.Load(); q != 0 {
			t.Errorf("%d bytes still counted as queued", q)
		}
	}
}

// TestFrontConcurrentReaders: several goroutines may read a front at once,
// as a net.PacketConn allows. Datagrams that arrive together, with one
// wake-up (here three moved at a reload), reach every waiting reader.
func TestFrontConcurrentReaders(t *testing.T) {
	old, s := listenLocal(t)
	for i := range 3 {
		s.toCaddy(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 1000+uint16(i)), make([]byte, 100), netip.Addr{})
	}
	next, err := Listen(s.Key(), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	read := make(chan error, 3)
	for range 3 {
		go func() {
			_, _, err := next.ReadFrom(make([]byte, BufferSize))
			read <- err
		}()
	}
	time.Sleep(100 * time.Millisecond) // the readers wait
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		select {
		case err := <-read:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("%d of 3 waiting readers got a datagram; %d still queued", i, next.waiting())
		}
	}
}
