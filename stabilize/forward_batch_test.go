package stabilize

import (
	"bytes"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
)

// A read batch's datagrams of one flow reach the upstreams whole and in
// order, whether they leave as one UDP GSO datagram (one upstream, equal
// sizes but the last), with one sendmmsg (sizes differ, or several
// upstreams) or one by one (a PROXY header).
func TestForwardBatch(t *testing.T) {
	equal := func(n int) [][]byte {
		var ds [][]byte
		for i := range n {
			ds = append(ds, fmt.Appendf(nil, "equal-%03d", i))
		}
		return append(ds, []byte("end")) // shorter
	}
	mixed := [][]byte{[]byte("a"), []byte("bb"), []byte("ccc"), {}, []byte("dddd"), []byte("e")}
	for _, tc := range []struct {
		name  string
		per   string
		extra map[string]any
		ds    [][]byte
	}{
		{"gso", PerFlow, nil, equal(40)},
		{"gso_full_batch", PerFlow, nil, equal(64 + 10)}, // more than a sendBatch
		{"sendmmsg", PerFlow, nil, mixed},
		{"upstreams", PerPacket, nil, equal(9)},
		{"proxy_protocol", PerFlow, map[string]any{"proxy_protocol": "v2"}, equal(5)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := startRawUpstream(t, false, true), startRawUpstream(t, false, true)
			handler := rawHandler(tc.per, a, b)
			for k, v := range tc.extra {
				handler[k] = v
			}
			tr := trackHandlers(t)
			lb := startBalancerOn(t, FastNetwork, false, 30*time.Second, handler)
			cl := newClient(t, lb.addr)
			if _, err := cl.conn.Write([]byte("open")); err != nil {
				t.Fatal(err)
			}
			h := tr.latest()
			var fl *Flow
			eventually(t, 2*time.Second, "the flow", func() bool {
				h.mu.Lock()
				defer h.mu.Unlock()
				for f := range h.flows {
					fl = f
				}
				return fl != nil
			})
			eventually(t, 2*time.Second, "the first datagram", func() bool { return a.got.Load()+b.got.Load() == 1 })
			ds := make([]fastudp.Datagram, len(tc.ds))
			for i, d := range tc.ds {
				ds[i] = fastudp.Datagram{B: d}
			}
			fl.forwardBatch(ds)
			want := 1 + len(ds)
			eventually(t, 2*time.Second, "every datagram", func() bool { return int(a.got.Load()+b.got.Load()) >= want })
			time.Sleep(20 * time.Millisecond) // nothing more
			var got [][]byte
			for _, u := range []*rawUpstream{a, b} {
				for _, d := range u.recorded() {
					if h.ProxyProtocol != "" {
						d = d[len(fl.header):]
					}
					if !bytes.Equal(d, []byte("open")) {
						got = append(got, d)
					}
				}
			}
			if tc.per == PerPacket {
				// Round robin: the upstreams share them, each in order.
				if a.got.Load() == 0 || b.got.Load() == 0 {
					t.Errorf("per packet: %d and %d datagrams, want both upstreams used", a.got.Load(), b.got.Load())
				}
				got = interleave(a, b)
			}
			if len(got) != len(tc.ds) {
				t.Fatalf("got %d datagrams, want %d: %q", len(got), len(tc.ds), got)
			}
			for i := range got {
				if !bytes.Equal(got[i], tc.ds[i]) {
					t.Fatalf("datagram %d: %q, want %q", i, got[i], tc.ds[i])
				}
			}
			if d := h.Drops(); d["send_buffer_full"]+d["write_error"] != 0 {
				t.Errorf("drops: %v", d)
			}
		})
	}
}

// interleave merges what two upstreams recorded by round robin, leaving out
// the flow's first datagram.
func interleave(a, b *rawUpstream) [][]byte {
	lists := [][][]byte{a.recorded(), b.recorded()}
	turn := 0
	if bytes.Equal(lists[0][0], []byte("open")) {
		lists[0] = lists[0][1:]
		turn = 1
	} else {
		lists[1] = lists[1][1:]
	}
	var out [][]byte
	for len(lists[0])+len(lists[1]) > 0 {
		if len(lists[turn]) > 0 {
			out = append(out, lists[turn][0])
			lists[turn] = lists[turn][1:]
		}
		turn = 1 - turn
	}
	return out
}

// A burst of requests of one size from one client, answered at once, comes
// back whole: the reply reactor sends replies to one client of one size as
// one UDP GSO datagram, which the kernel splits.
func TestReplyBurst(t *testing.T) {
	forPaths(t, granularities, func(t *testing.T, network, per string) {
		a, b := startRawUpstream(t, true, false), startRawUpstream(t, true, false)
		lb := startBalancerOn(t, network, false, 30*time.Second, rawHandler(per, a, b))
		cl := newClient(t, lb.addr)
		if _, err := cl.conn.Write([]byte("open-000")); err != nil {
			t.Fatal(err)
		}
		if _, err := cl.conn.Read(cl.buf); err != nil {
			t.Fatal(err)
		}
		const n = 200
		want := make(map[string]bool, n)
		for i := range n {
			p := fmt.Sprintf("req-%04d", i)
			want[p] = true
			if _, err := cl.conn.Write([]byte(p)); err != nil {
				t.Fatal(err)
			}
		}
		_ = cl.conn.SetReadDeadline(time.Now().Add(3 * time.Second))
		for len(want) > 0 {
			m, err := cl.conn.Read(cl.buf)
			if err != nil {
				t.Fatalf("%d replies missing (%v), such as %v", len(want), err, firstKey(want))
			}
			if !want[string(cl.buf[:m])] {
				t.Fatalf("unexpected reply %q", cl.buf[:m])
			}
			delete(want, string(cl.buf[:m]))
		}
	})
}

func firstKey(m map[string]bool) string {
	for k := range m {
		return k
	}
	return ""
}

// With several fastudp readers (SO_REUSEPORT sockets, the stabilize app's
// fastudp_readers), every flow stays on its upstream and gets its replies,
// also across reloads that add readers or take them away.
func TestFastReaders(t *testing.T) {
	a, b, c := startUpstream(t, "a"), startUpstream(t, "b"), startUpstream(t, "c")
	lb := startBalancerOn(t, FastNetwork, false, 30*time.Second, handlerConfig(PerFlow, "round_robin", a, b, c))
	clients := make([]*client, 30)
	first := make([]string, len(clients))
	for round, readers := range []int{2, 3, 0} {
		cfg := testConfigOn(FastNetwork, lb.addr, "", 30*time.Second, handlerConfig(PerFlow, "round_robin", a, b, c))
		if readers != 0 {
			cfg = withStabilizeApp(t, cfg, map[string]any{"fastudp_readers": readers})
		}
		if err := caddy.Load(cfg, true); err != nil {
			t.Fatalf("loading config with %d readers: %v", readers, err)
		}
		if n, want := fastSocketAt(t, lb.addr).Readers(), max(readers, 1); n != want {
			t.Fatalf("%d readers, want %d", n, want)
		}
		for i := range clients {
			if round == 0 {
				clients[i] = newClient(t, lb.addr)
			}
			name := clients[i].mustRoundTrip(fmt.Sprintf("c%d-r%d", i, round))
			if round == 0 {
				first[i] = name
			} else if name != first[i] {
				t.Fatalf("client %d moved from %s to %s with %d readers", i, first[i], name, readers)
			}
		}
	}
	if got := counts(first); got != "map[a:10 b:10 c:10]" {
		t.Errorf("flows per upstream: %s", got)
	}
}

// withStabilizeApp adds the stabilize app, with the given settings, to the
// config cfg.
func withStabilizeApp(t testing.TB, cfg []byte, app map[string]any) []byte {
	t.Helper()
	var doc map[string]any
	if err := json.Unmarshal(cfg, &doc); err != nil {
		t.Fatal(err)
	}
	doc["apps"].(map[string]any)["stabilize"] = app
	out, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
