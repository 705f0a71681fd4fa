package stabilize

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// provisionHandler provisions a handler from JSON in a context of its own.
func provisionHandler(t testing.TB, cfg string) *Handler {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	return provisionIn(t, ctx, cfg)
}

func maglevConfig(ports ...int) string {
	ups := ""
	for i, p := range ports {
		if i > 0 {
			ups += ","
		}
		ups += fmt.Sprintf(`{"dial":"udp/127.0.0.1:%d"}`, p)
	}
	return `{"upstreams":[` + ups + `],"load_balancing":{"selection":{"policy":"maglev"}}}`
}

// maglevChoices maps 10,000 client keys to upstream ports.
func maglevChoices(h *Handler) []uint16 {
	out := make([]uint16, 10000)
	for i := range out {
		fl := &Flow{h: h, req: Request{Client: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), uint16(1024+i))}}
		out[i] = h.router.route(fl, nil).addr.Port()
	}
	return out
}

func TestMaglevAgreesAcrossHandlers(t *testing.T) {
	h1 := provisionHandler(t, maglevConfig(7001, 7002, 7003, 7004, 7005))
	h2 := provisionHandler(t, maglevConfig(7005, 7003, 7001, 7002, 7004)) // another order
	c1, c2 := maglevChoices(h1), maglevChoices(h2)
	for i := range c1 {
		if c1[i] != c2[i] {
			t.Fatalf("key %d: handler 1 picks %d, handler 2 picks %d", i, c1[i], c2[i])
		}
	}
	spread := map[uint16]int{}
	for _, p := range c1 {
		spread[p]++
	}
	for p, n := range spread {
		if n < 1800 || n > 2200 {
			t.Errorf("upstream %d got %d of 10000 keys, want 2000 ±10%%", p, n)
		}
	}
}

func TestMaglevRemovalMovesFewKeys(t *testing.T) {
	before := maglevChoices(provisionHandler(t, maglevConfig(7001, 7002, 7003, 7004, 7005)))
	after := maglevChoices(provisionHandler(t, maglevConfig(7001, 7002, 7004, 7005)))
	moved, collateral := 0, 0
	for i := range before {
		if before[i] != after[i] {
			moved++
			if before[i] != 7003 {
				collateral++
			}
		}
	}
	// Maglev moves a few keys between the remaining upstreams too.
	if collateral > 100 {
		t.Errorf("%d of 10000 keys moved between upstreams that stayed, want under 1%%", collateral)
	}
	if moved < 1500 || moved > 2500 {
		t.Fatalf("removing 1 of 5 upstreams moved %d of 10000 keys, want 15%%-25%%", moved)
	}
}

func TestSmoothWeighted(t *testing.T) {
	ups := []*Upstream{{Dial: "a", Weight: 5}, {Dial: "b", Weight: 1}, {Dial: "c", Weight: 1}}
	var got string
	for _, u := range smoothWeighted(ups) {
		got += u.Dial
	}
	if got != "aabacaa" {
		t.Fatalf("smooth weighted order %q, want nginx's aabacaa", got)
	}
}

func BenchmarkSelect(b *testing.B) {
	for _, policy := range []string{"round_robin", "weighted_round_robin", "random", "random_choose", "least_sessions", "first", "maglev"} {
		b.Run(policy, func(b *testing.B) {
			h := provisionHandler(b, fmt.Sprintf(`{"upstreams":[{"dial":"udp/127.0.0.1:7001","weight":3},{"dial":"udp/127.0.0.1:7002"},{"dial":"udp/127.0.0.1:7003"}],"per":"packet","load_balancing":{"selection":{"policy":%q}}}`, policy))
			fl := &Flow{h: h, req: Request{Client: netip.MustParseAddrPort("10.0.0.1:4000")}}
			b.ReportAllocs()
			for b.Loop() {
				if h.router.route(fl, nil) == nil {
					b.Fatal("no upstream")
				}
			}
		})
	}
}
