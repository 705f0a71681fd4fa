package stabilize

import (
	"encoding/binary"
	"net/netip"
	"runtime/metrics"
	"sync/atomic"
	"testing"
	"time"
)

// fillCIDTable learns n 8-octet connection IDs, numbered from 0, with ttl.
func fillCIDTable(tb *cidTable, n int, ttl time.Duration) {
	var cid [8]byte
	for i := range n {
		binary.BigEndian.PutUint64(cid[:], uint64(i))
		tb.learn(cid[:], addrKey{port: 1}, ttl, false)
	}
}

// TestCIDTableSweepBatches fills a table to its cap and sweeps it: the
// sweep takes no write lock while nothing has expired, and then deletes a
// small share of the entries under each hold of a write lock, never walks
// the whole table under one, so that a lookup on a reader waits for a
// short while at most; and it drops exactly the expired entries.
func TestCIDTableSweepBatches(t *testing.T) {
	tb := newCIDTable()
	const live = 1000
	fillCIDTable(tb, maxConnectionIDs-live, time.Minute)
	var cid [8]byte
	for i := range live {
		binary.BigEndian.PutUint64(cid[:], 1<<40+uint64(i))
		tb.learn(cid[:], addrKey{port: 2}, time.Hour, false)
	}
	if n := tb.len(); n != maxConnectionIDs {
		t.Fatalf("%d entries, want the cap %d", n, maxConnectionIDs)
	}
	if held := tb.sweep(tb.now.Load()); held != 0 {
		t.Errorf("a sweep with nothing expired held a write lock over %d entries", held)
	}
	if n := tb.len(); n != maxConnectionIDs {
		t.Errorf("a sweep before any TTL passed left %d entries of %d", n, maxConnectionIDs)
	}
	most := maxConnectionIDs / 64
	if held := tb.sweep(tb.now.Load() + int64(2*time.Minute)); held > most {
		t.Errorf("the sweep held a write lock over %d entries, over %d", held, most)
	} else {
		t.Logf("the sweep of %d expired entries held a write lock over %d at most", maxConnectionIDs-live, held)
	}
	if n := tb.len(); n != live {
		t.Errorf("%d entries after the sweep, want the %d live ones", n, live)
	}
	for i := range live {
		binary.BigEndian.PutUint64(cid[:], 1<<40+uint64(i))
		if got, ok := tb.lookup(cid[:]); !ok || got.port != 2 {
			t.Fatalf("live entry %d: %v, %v", i, got, ok)
		}
	}
}

// BenchmarkCIDTableLookupDuringSweep looks up connection IDs in a table
// at its cap while the janitor's sweep runs every 5 ms instead of every
// second. wait-µs/sweep is the time goroutines spent blocked on locks
// (the runtime's count) per sweep, max-µs the longest a lookup took, which
// on a busy machine includes the time the OS took the CPU away.
func BenchmarkCIDTableLookupDuringSweep(b *testing.B) {
	tb := newCIDTable()
	fillCIDTable(tb, maxConnectionIDs, time.Hour)
	var stop atomic.Bool
	var sweeps atomic.Int64
	swept := make(chan struct{})
	wait := []metrics.Sample{{Name: "/sync/mutex/wait/total:seconds"}}
	metrics.Read(wait)
	waited := wait[0].Value.Float64()
	go func() {
		defer close(swept)
		for !stop.Load() {
			tb.sweep(tb.now.Load())
			sweeps.Add(1)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	var cid [8]byte
	var longest time.Duration
	for i := 0; b.Loop(); i++ {
		binary.BigEndian.PutUint64(cid[:], uint64(i%maxConnectionIDs))
		start := time.Now()
		if _, ok := tb.lookup(cid[:]); !ok {
			b.Fatal("entry missing")
		}
		longest = max(longest, time.Since(start))
	}
	stop.Store(true)
	<-swept
	metrics.Read(wait)
	waited = wait[0].Value.Float64() - waited
	b.ReportMetric(waited*1e6/float64(max(1, sweeps.Load())), "wait-µs/sweep")
	b.ReportMetric(float64(longest.Microseconds()), "max-µs")
}

// TestCIDTableSetListeners: a set gives each listener a table of its own,
// the same one to every holder; a table no handler holds stays while it
// has entries and goes once they have expired.
func TestCIDTableSetListeners(t *testing.T) {
	// No janitor: the test's sweeps are the only ones (sweep is the
	// janitor's, never called concurrently).
	s := &cidTableSet{tables: make(map[netip.AddrPort]*cidTable)}
	a, b := netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2")
	ta, tb := s.acquire(a, true), s.acquire(b, true)
	if ta == tb {
		t.Fatal("two listeners share a table")
	}
	if s.acquire(a, true) != ta {
		t.Fatal("a second holder of a listener got another table")
	}
	fillCIDTable(ta, 10, time.Second)
	s.release(ta)
	s.release(ta)
	s.release(tb)
	s.sweep(ta.now.Load())
	if s.acquire(a, false) != ta {
		t.Error("a table with entries that no handler held was dropped")
	}
	if s.acquire(b, false) == tb {
		t.Error("an empty table that no handler held was kept")
	}
	s.sweep(ta.now.Load() + int64(2*time.Second))
	if s.acquire(a, false) == ta {
		t.Error("a table no handler held was kept after its entries expired")
	}
}
