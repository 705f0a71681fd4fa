// Package maglev implements the Maglev consistent-hash lookup table from
// Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
// Balancer" (NSDI 2016), section 3.4.
//
// Each backend name yields two hashes: offset = h1(name) mod M and
// skip = h2(name) mod (M-1) + 1. Backend i's preference list is the
// permutation p[i][j] = (offset + j*skip) mod M. The table of M slots is
// filled by giving backends turns in a fixed order; on its turn a backend
// takes the next slot of its preference list that is still empty. Every
// backend therefore owns floor(M/N) or ceil(M/N) slots, and when the set of
// backends changes most slots keep their owner.
//
// M must be prime: then every skip in [1, M-1] is coprime with M, so each
// preference list is a full permutation of the slots and a backend always
// finds an empty slot while one remains.
//
// Tables are immutable once built and safe for concurrent use. The hash
// functions here are fixed (no per-process seed), so separate processes and
// machines given the same backend names build identical tables and send the
// same key to the same backend.
package maglev

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

const (
	// minSize is the floor for New's table size. Larger tables move fewer
	// extra keys when a backend leaves (with 5 backends: about 1.8% of all
	// keys beyond the leaving backend's share at M=1009, 0.2% at M=16411)
	// but cost more to build; 16411 slots are 64 KiB and build in ~0.2 ms.
	minSize = 16384
	// slotsPerBackend is the paper's advice: M well above 100*N keeps the
	// imbalance between backends within about 1%.
	slotsPerBackend = 100
	// maxSize bounds NewSize so a mistaken argument cannot exhaust memory.
	maxSize = 1 << 26
)

// Table maps a key hash to the index of a backend. The zero value and a
// nil *Table are empty tables.
type Table struct {
	entry []int32 // slot -> index into the caller's names; len(entry) == M
}

// New builds a table for backend names, which should be stable identities
// such as "udp/127.0.0.1:6001". Every backend has weight 1. The table size M
// is the smallest prime >= max(16384, 100*len(names)), so 16411
// for up to 164 backends.
//
// The mapping depends only on the set of names, not on their order, so
// balancers that list the same upstreams differently agree. Lookup returns
// indexes into names. Names should be unique; a repeated name is ignored
// after its first occurrence (Lookup never returns the later index).
func New(names []string) *Table {
	return build(names, nil, defaultSize(len(names)))
}

// NewWeighted is like New but gives backend i weights[i] turns in every
// round of the table fill, so it owns about weights[i]/sum(weights) of the
// slots. Only the ratios matter: weights are divided by their greatest
// common divisor, so all-equal weights give the same table as New. A weight
// of 0 removes the backend from the table. The table size is the same as
// New's, so ratios are resolved to about 1/M. It returns an error if the
// lengths differ or a weight is negative.
func NewWeighted(names []string, weights []int) (*Table, error) {
	if len(weights) != len(names) {
		return nil, fmt.Errorf("maglev: %d weights for %d names", len(weights), len(names))
	}
	for i, w := range weights {
		if w < 0 {
			return nil, fmt.Errorf("maglev: negative weight %d for %q", w, names[i])
		}
	}
	return build(names, weights, defaultSize(len(names))), nil
}

// NewSize is like New but with an explicit table size m, mainly for tests
// and benchmarks. m must be a prime no larger than 1<<26 and should be much
// larger than len(names).
func NewSize(names []string, m int) (*Table, error) {
	if m > maxSize {
		return nil, fmt.Errorf("maglev: table size %d exceeds %d", m, maxSize)
	}
	if !isPrime(m) {
		return nil, fmt.Errorf("maglev: table size %d is not prime", m)
	}
	return build(names, nil, m), nil
}

// Lookup returns the index (into the names given when building) of the
// backend for a key hash, or -1 if the table has no backends. It does not
// allocate.
func (t *Table) Lookup(hash uint64) int {
	if t == nil || len(t.entry) == 0 {
		return -1
	}
	return int(t.entry[hash%uint64(len(t.entry))])
}

// Size returns the number of slots M, or 0 if the table has no backends.
func (t *Table) Size() int {
	if t == nil {
		return 0
	}
	return len(t.entry)
}

// backend is the fill state of one backend.
type backend struct {
	index int // into the caller's names
	skip  int
	pos   int // next candidate slot in its preference list
	turns int // slots taken per round
}

func build(names []string, weights []int, m int) *Table {
	var bs []backend
	seen := make(map[string]bool, len(names))
	g := 0
	for i, name := range names {
		if seen[name] {
			continue
		}
		seen[name] = true
		w := 1
		if weights != nil {
			w = weights[i]
		}
		if w == 0 {
			continue
		}
		h := HashString(name)
		bs = append(bs, backend{
			index: i,
			pos:   int(mix64(h^offsetSeed) % uint64(m)),
			skip:  int(mix64(h^skipSeed)%uint64(m-1)) + 1,
			turns: w,
		})
		g = gcd(g, w)
	}
	if len(bs) == 0 {
		return &Table{}
	}
	// Turn order by name, so only the set of names matters.
	slices.SortFunc(bs, func(a, b backend) int {
		return strings.Compare(names[a.index], names[b.index])
	})
	entry := make([]int32, m)
	for j := range entry {
		entry[j] = -1
	}
	for filled := 0; ; {
		for k := range bs {
			b := &bs[k]
			for range b.turns / g {
				for entry[b.pos] >= 0 {
					b.pos += b.skip
					if b.pos >= m {
						b.pos -= m
					}
				}
				entry[b.pos] = int32(b.index)
				if filled++; filled == m {
					return &Table{entry: entry}
				}
			}
		}
	}
}

// defaultSize returns the smallest prime >= max(minSize, 100*n).
func defaultSize(n int) int {
	m := max(minSize, slotsPerBackend*n)
	for !isPrime(m) {
		m++
	}
	return m
}

func isPrime(n int) bool {
	if n < 2 {
		return false
	}
	if n%2 == 0 || n%3 == 0 {
		return n <= 3
	}
	for d := 5; d*d <= n; d += 6 {
		if n%d == 0 || n%(d+2) == 0 {
			return false
		}
	}
	return true
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// Seeds separating the hashes derived from one name or address. They are
// fixed forever: changing them (or the hash functions) remaps every key.
const (
	offsetSeed = 0x9e3779b97f4a7c15
	skipSeed   = 0xc2b2ae3d27d4eb4f
	addrSeed   = 0x165667b19e3779f9
)

// HashString returns a stable 64-bit hash of s: FNV-1a 64 followed by the
// SplitMix64 finalizer for good avalanche. It does not allocate and gives
// the same result in every process on every machine.
func HashString(s string) uint64 { return mix64(fnv1a(s)) }

// HashBytes is HashString for a byte slice: HashBytes([]byte(s)) ==
// HashString(s). It does not allocate.
func HashBytes(b []byte) uint64 { return mix64(fnv1a(b)) }

// HashAddr returns a stable 64-bit hash of an IP address, ignoring any zone.
// An IPv4 address and its IPv4-mapped IPv6 form hash alike; the zero Addr
// hashes like "::". It does not allocate.
func HashAddr(a netip.Addr) uint64 {
	b := a.As16()
	hi := binary.BigEndian.Uint64(b[:8])
	lo := binary.BigEndian.Uint64(b[8:])
	return mix64(mix64(hi^addrSeed) ^ lo)
}

// HashAddrPort returns a stable 64-bit hash of an IP address and port, with
// HashAddr's treatment of the address. It does not allocate.
func HashAddrPort(ap netip.AddrPort) uint64 {
	return mix64(HashAddr(ap.Addr()) ^ uint64(ap.Port()))
}

func fnv1a[T string | []byte](s T) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}

// mix64 is the SplitMix64 finalizer, a bijection on uint64.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
