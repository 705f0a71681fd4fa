package maglev

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

func backends(n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("udp/127.0.0.1:%d", 6001+i)
	}
	return names
}

// keys returns n deterministic key hashes: client-<i> strings.
func keys(n int) []uint64 {
	ks := make([]uint64, n)
	for i := range ks {
		ks[i] = HashString(fmt.Sprintf("client-%d", i))
	}
	return ks
}

// addrKeys returns n deterministic key hashes: 127.0.0.1:<port> and
// 10.x.y.z:5000 AddrPorts, alternating.
func addrKeys(n int) []uint64 {
	ks := make([]uint64, n)
	for i := range ks {
		ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(20000+i))
		if i%2 == 1 {
			ap = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 5000)
		}
		ks[i] = HashAddrPort(ap)
	}
	return ks
}

// reference is the paper's POPULATE pseudocode, run with an explicit
// permutation table over the sorted unique names.
func reference(names []string, m int) []string {
	sorted := slices.Clone(names)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	n := len(sorted)
	perm := make([][]int, n)
	for i, name := range sorted {
		h := HashString(name)
		offset := mix64(h^offsetSeed) % uint64(m)
		skip := mix64(h^skipSeed)%uint64(m-1) + 1
		perm[i] = make([]int, m)
		for j := range m {
			perm[i][j] = int((offset + uint64(j)*skip) % uint64(m))
		}
	}
	next := make([]int, n)
	entry := make([]int, m)
	for j := range entry {
		entry[j] = -1
	}
	for filled := 0; filled < m; {
		for i := 0; i < n && filled < m; i++ {
			c := perm[i][next[i]]
			for entry[c] >= 0 {
				next[i]++
				c = perm[i][next[i]]
			}
			entry[c] = i
			next[i]++
			filled++
		}
	}
	out := make([]string, m)
	for j, i := range entry {
		out[j] = sorted[i]
	}
	return out
}

func TestMatchesPaper(t *testing.T) {
	for _, m := range []int{2, 13, 101, 1009, 16411} {
		for _, n := range []int{1, 2, 5, 7} {
			names := backends(n)
			slices.Reverse(names) // caller order differs from turn order
			tab, err := NewSize(names, m)
			if err != nil {
				t.Fatal(err)
			}
			want := reference(names, m)
			for s := range m {
				if got := names[tab.Lookup(uint64(s))]; got != want[s] {
					t.Fatalf("m=%d n=%d slot %d: got %s, paper gives %s", m, n, s, got, want[s])
				}
			}
		}
	}
}

func TestDeterminism(t *testing.T) {
	names := backends(5)
	a, b := New(names), New(slices.Clone(names))
	shuffled := slices.Clone(names)
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	if slices.Equal(names, shuffled) {
		t.Fatal("shuffle kept the order")
	}
	c := New(shuffled)
	for i, k := range keys(10000) {
		x, y, z := a.Lookup(k), b.Lookup(k), c.Lookup(k)
		if x != y || names[x] != shuffled[z] {
			t.Fatalf("key %d: %s, %s, %s (shuffled order)", i, names[x], names[y], shuffled[z])
		}
	}
}

// TestGolden pins hash values and mappings. If it fails, keys are remapped
// between versions and a rolling upgrade breaks affinity: do not update the
// constants lightly.
func TestGolden(t *testing.T) {
	hashes := []struct {
		name string
		got  uint64
		want uint64
	}{
		{"HashString empty", HashString(""), 0xf52a15e9a9b5e89b},
		{"HashString client-0", HashString("client-0"), 0x9d0dc59b45c5acab},
		{"HashAddr 192.0.2.1", HashAddr(netip.MustParseAddr("192.0.2.1")), 0x7bba6c7dc42f1c5f},
		{"HashAddrPort [2001:db8::1]:53", HashAddrPort(netip.MustParseAddrPort("[2001:db8::1]:53")), 0xca10f87b23882dc8},
	}
	for _, h := range hashes {
		if h.got != h.want {
			t.Errorf("%s = %#x, want %#x", h.name, h.got, h.want)
		}
	}
	names := backends(5)
	tab := New(names)
	var got []int
	for _, k := range keys(16) {
		got = append(got, tab.Lookup(k))
	}
	want := []int{2, 2, 1, 4, 3, 1, 2, 3, 2, 0, 3, 0, 2, 3, 4, 1}
	if !slices.Equal(got, want) {
		t.Errorf("lookups = %#v, want %#v", got, want)
	}
}

func TestDisruption(t *testing.T) {
	names := backends(5)
	before := New(names)
	ks := keys(10000)
	for rm := range names {
		rest := slices.Delete(slices.Clone(names), rm, rm+1)
		after := New(rest)
		moved, extra := 0, 0
		for _, k := range ks {
			x, y := names[before.Lookup(k)], rest[after.Lookup(k)]
			if x != y {
				moved++
				if x != names[rm] {
					extra++
				}
			}
		}
		t.Logf("removing %s moved %d keys (%d not on it)", names[rm], moved, extra)
		if moved < 1500 || moved > 2500 {
			t.Errorf("removing %s moved %d of 10000 keys, want 15%%..25%%", names[rm], moved)
		}
		if extra > 100 {
			t.Errorf("removing %s moved %d keys of surviving backends, want <= 1%%", names[rm], extra)
		}
	}
	// Adding a sixth backend should move about 1/6 of keys, all onto it.
	more := append(slices.Clone(names), "udp/127.0.0.1:7000")
	after := New(more)
	moved, extra := 0, 0
	for _, k := range ks {
		if x, y := before.Lookup(k), after.Lookup(k); x != y {
			moved++
			if y != 5 {
				extra++
			}
		}
	}
	t.Logf("adding a backend moved %d keys (%d not onto it)", moved, extra)
	if moved < 1400 || moved > 2000 || extra > 100 {
		t.Errorf("adding a backend moved %d of 10000 keys (%d not onto it), want about 1667 (<= 100)", moved, extra)
	}
}

func TestBalance(t *testing.T) {
	names := backends(5)
	tab := New(names)

	slots := make([]int, len(names))
	for s := range tab.Size() {
		slots[tab.Lookup(uint64(s))]++
	}
	if lo, hi := slices.Min(slots), slices.Max(slots); hi-lo > 1 {
		t.Errorf("slot counts %v differ by more than 1", slots)
	}

	for kind, ks := range map[string][]uint64{"client-<i>": keys(10000), "AddrPort": addrKeys(10000)} {
		count := make([]int, len(names))
		for _, k := range ks {
			count[tab.Lookup(k)]++
		}
		t.Logf("%s keys per backend: %v", kind, count)
		for i, c := range count {
			if c < 1800 || c > 2200 { // 20% ± 10% of 20%
				t.Errorf("%s keys: %s got %d of 10000, want 1800..2200", kind, names[i], c)
			}
		}
	}
}

func TestWeighted(t *testing.T) {
	names := backends(4)
	tab, err := NewWeighted(names, []int{1, 2, 3, 0})
	if err != nil {
		t.Fatal(err)
	}
	slots := make([]int, len(names))
	for s := range tab.Size() {
		slots[tab.Lookup(uint64(s))]++
	}
	for i, w := range []int{1, 2, 3, 0} {
		want := tab.Size() * w / 6
		if d := slots[i] - want; d < -3 || d > 3 {
			t.Errorf("weight %d: %d slots, want about %d", w, slots[i], want)
		}
	}

	// Equal weights of any size give New's table.
	eq, _ := NewWeighted(names, []int{7, 7, 7, 7})
	plain := New(names)
	for _, k := range keys(10000) {
		if eq.Lookup(k) != plain.Lookup(k) {
			t.Fatal("equal weights differ from New")
		}
	}

	if _, err := NewWeighted(names, []int{1, 2}); err == nil {
		t.Error("length mismatch: no error")
	}
	if _, err := NewWeighted(names, []int{1, -1, 1, 1}); err == nil {
		t.Error("negative weight: no error")
	}
	zero, err := NewWeighted(names, make([]int, 4))
	if err != nil || zero.Lookup(1) != -1 {
		t.Errorf("all-zero weights: Lookup = %d, err %v; want -1, nil", zero.Lookup(1), err)
	}
}

func TestEdgeCases(t *testing.T) {
	var nilTable *Table
	for name, tab := range map[string]*Table{"nil names": New(nil), "zero Table": {}, "nil *Table": nilTable} {
		if got := tab.Lookup(12345); got != -1 {
			t.Errorf("%s: Lookup = %d, want -1", name, got)
		}
		if got := tab.Size(); got != 0 {
			t.Errorf("%s: Size = %d, want 0", name, got)
		}
	}

	one := New([]string{"udp/127.0.0.1:6001"})
	for _, k := range keys(1000) {
		if got := one.Lookup(k); got != 0 {
			t.Fatalf("single backend: Lookup = %d", got)
		}
	}

	// Duplicates: the first occurrence owns the name, later ones get nothing.
	dup := []string{"b", "a", "b", "c", "a"}
	tab := New(dup)
	dedup := New([]string{"a", "b", "c"})
	for _, k := range keys(10000) {
		i := tab.Lookup(k)
		if i > 3 || i == 2 {
			t.Fatalf("duplicate name: Lookup returned later index %d", i)
		}
		if dup[i] != []string{"a", "b", "c"}[dedup.Lookup(k)] {
			t.Fatal("duplicates change the mapping of the unique set")
		}
	}
}

func TestSizes(t *testing.T) {
	if got := New(backends(5)).Size(); got != 16411 {
		t.Errorf("New(5 names).Size() = %d, want 16411", got)
	}
	if got := New(backends(200)).Size(); got != 20011 {
		t.Errorf("New(200 names).Size() = %d, want 20011", got)
	}
	for _, m := range []int{-7, 0, 1, 4, 1000, 65535, maxSize + 1} {
		if _, err := NewSize(backends(3), m); err == nil {
			t.Errorf("NewSize(m=%d): no error", m)
		}
	}
	for _, m := range []int{2, 3, 65537} {
		tab, err := NewSize(backends(3), m)
		if err != nil || tab.Size() != m {
			t.Errorf("NewSize(m=%d): size %d, err %v", m, tab.Size(), err)
		}
	}
}

func TestHashAddr(t *testing.T) {
	v4 := netip.MustParseAddr("192.0.2.1")
	if HashAddr(v4) != HashAddr(netip.MustParseAddr("::ffff:192.0.2.1")) {
		t.Error("IPv4 and IPv4-mapped IPv6 hash differently")
	}
	if HashAddr(netip.MustParseAddr("fe80::1%eth0")) != HashAddr(netip.MustParseAddr("fe80::1")) {
		t.Error("zone changes the hash")
	}
	if HashAddr(v4) == HashAddr(netip.MustParseAddr("192.0.2.2")) {
		t.Error("neighbouring addresses collide")
	}
	if HashAddrPort(netip.AddrPortFrom(v4, 1)) == HashAddrPort(netip.AddrPortFrom(v4, 2)) {
		t.Error("port does not change the hash")
	}
	if HashBytes([]byte("client-7")) != HashString("client-7") {
		t.Error("HashBytes != HashString")
	}
}

func TestNoAllocs(t *testing.T) {
	tab := New(backends(5))
	ap := netip.MustParseAddrPort("[2001:db8::1]:4242")
	b := []byte("udp/127.0.0.1:6001")
	var sink uint64
	for name, f := range map[string]func(){
		"Lookup":       func() { sink += uint64(tab.Lookup(sink)) },
		"HashString":   func() { sink += HashString("udp/127.0.0.1:6001") },
		"HashBytes":    func() { sink += HashBytes(b) },
		"HashAddr":     func() { sink += HashAddr(ap.Addr()) },
		"HashAddrPort": func() { sink += HashAddrPort(ap) },
	} {
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s: %v allocs/op, want 0", name, n)
		}
	}
}

func BenchmarkLookup(b *testing.B) {
	tab := New(backends(5))
	ks := keys(1024)
	b.ReportAllocs()
	var sink int
	for i := 0; b.Loop(); i++ {
		sink += tab.Lookup(ks[i&1023])
	}
	_ = sink
}

func BenchmarkHashAddrPort(b *testing.B) {
	ap := netip.MustParseAddrPort("[2001:db8::1]:4242")
	b.ReportAllocs()
	var sink uint64
	for b.Loop() {
		sink += HashAddrPort(ap)
		ap = netip.AddrPortFrom(ap.Addr(), uint16(sink))
	}
}

func BenchmarkHashString(b *testing.B) {
	b.ReportAllocs()
	var sink uint64
	for b.Loop() {
		sink += HashString("udp/127.0.0.1:6001")
	}
	_ = sink
}

func BenchmarkNew(b *testing.B) {
	for _, n := range []int{5, 100} {
		names := backends(n)
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				New(names)
			}
		})
	}
}
