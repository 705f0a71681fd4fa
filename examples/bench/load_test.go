//go:build linux

package main

import (
	"context"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpecho"
)

// echoServer starts a udpecho server on a free loopback port, with the
// benchmark's socket buffers (as its upstreams have).
func echoServer(t *testing.T) *udpecho.Server {
	t.Helper()
	s, err := udpecho.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	bigBuffers(t, s)
	return s
}

// bigBuffers gives c the benchmark's socket buffers.
func bigBuffers(t *testing.T, c syscall.Conn) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := setSockBuf(rc, sockBuf); err != nil {
		t.Fatal(err)
	}
}

// TestRunLoad drives closed loops and fixed-rate loads against an echo
// server, and a closed loop against a silent one: every request is
// accounted for, answered or lost, and every answer has its latency.
func TestRunLoad(t *testing.T) {
	srv := echoServer(t)
	silent := echoServer(t)
	silent.SetSilent(true)
	base := loadConfig{
		payload: 64, warmup: 100 * time.Millisecond, duration: 400 * time.Millisecond,
		timeout: time.Second, ramp: 50 * time.Millisecond, // a loaded CI machine under -race loses nothing
	}
	for _, tc := range []struct {
		name          string
		srv           *udpecho.Server
		flows, window int
		interval      time.Duration
		wantLost      bool
	}{
		{name: "closed loop, one flow, 64 outstanding", srv: srv, flows: 1, window: 64},
		{name: "closed loop, 300 flows", srv: srv, flows: 300, window: 1},
		{name: "fixed rate, 50 flows every 10ms", srv: srv, flows: 50, window: 1, interval: 10 * time.Millisecond},
		{name: "silent upstream", srv: silent, flows: 10, window: 2, wantLost: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lc := base
			lc.flows, lc.window, lc.interval = tc.flows, tc.window, tc.interval
			if tc.wantLost {
				lc.timeout = 100 * time.Millisecond // so that slots are refilled in the window
			}
			var started, ended bool
			hooks := loadHooks{start: func() { started = true }, end: func() { ended = started }}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			begin := time.Now()
			res, err := runLoad(ctx, tc.srv.Addr().String(), lc, hooks)
			if err != nil {
				t.Fatal(err)
			}
			if took := time.Since(begin); took > lc.warmup+lc.duration+lc.timeout+2*time.Second {
				t.Errorf("the load took %v", took)
			}
			if !started || !ended {
				t.Errorf("hooks: start %v, end after start %v", started, ended)
			}
			if res.Sent == 0 || res.Received+res.Lost != res.Sent {
				t.Errorf("sent %d, received %d, lost %d: not every request is accounted for", res.Sent, res.Received, res.Lost)
			}
			if int64(len(res.latencies)) != res.Received {
				t.Errorf("%d latencies for %d replies", len(res.latencies), res.Received)
			}
			if res.Corrupt != 0 || res.SendErrors != 0 {
				t.Errorf("corrupt %d, send errors %d", res.Corrupt, res.SendErrors)
			}
			if tc.wantLost {
				if res.Received != 0 {
					t.Errorf("received %d replies from a silent server", res.Received)
				}
				// Each slot is refilled once its request times out.
				if want := int64(tc.flows * tc.window * 2); res.Lost < want {
					t.Errorf("lost %d, want at least %d", res.Lost, want)
				}
				return
			}
			if res.Lost != 0 {
				t.Errorf("lost %d of %d on loopback", res.Lost, res.Sent)
			}
			if tc.interval > 0 {
				// 50 flows every 10 ms offer 5,000 datagrams/s: 2,000 in the window.
				want := float64(lc.duration) / float64(tc.interval) * float64(tc.flows)
				if got := float64(res.Sent); got < 0.6*want || got > 1.1*want {
					t.Errorf("fixed rate: sent %.0f in the window, want about %.0f", got, want)
				}
			}
		})
	}
}

// TestRunLoadRefusesRemote checks that the load generator only targets
// loopback.
func TestRunLoadRefusesRemote(t *testing.T) {
	lc := loadConfig{flows: 1, window: 1, payload: 64, duration: time.Millisecond, timeout: time.Millisecond}
	if _, err := runLoad(context.Background(), "192.0.2.1:9", lc, loadHooks{}); err == nil {
		t.Fatal("a target outside 127.0.0.0/8 was accepted")
	}
}

// TestDueHeap checks that sends come out in time order.
func TestDueHeap(t *testing.T) {
	var h dueHeap
	base := time.Now()
	for _, ms := range []int{5, 1, 9, 3, 3, 7, 0, 8, 2, 6, 4} {
		h.push(due{at: base.Add(time.Duration(ms) * time.Millisecond), flow: int32(ms)})
	}
	last := time.Time{}
	for n := 0; len(h) > 0; n++ {
		d := h.pop()
		if d.at.Before(last) {
			t.Fatalf("pop %d: %v before %v", n, d.at.Sub(base), last.Sub(base))
		}
		last = d.at
	}
}

// pickyEcho is a UDP server on a free loopback port that sends each
// datagram back as is, when answer says so for the datagram's source and
// the number of datagrams that source has sent before it.
func pickyEcho(t *testing.T, answer func(src *net.UDPAddr, before int) bool) string {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	bigBuffers(t, c)
	go func() {
		seen := map[string]int{}
		buf := make([]byte, 2048)
		for {
			n, src, err := c.ReadFromUDP(buf)
			if err != nil {
				return
			}
			k := src.String()
			if answer(src, seen[k]) {
				_, _ = c.WriteToUDP(buf[:n], src)
			}
			seen[k]++
		}
	}()
	return c.LocalAddr().String()
}

// TestRunLoadSetUp checks the sweep's set-up: every flow sends one datagram
// and again after each timeout until it has had a reply, and the load
// starts only then, with every flow answered and busy in the window; a
// flow that is never answered makes it give up at its limit, and the load
// runs anyway.
func TestRunLoadSetUp(t *testing.T) {
	base := loadConfig{
		flows: 200, window: 2, payload: 64, warmup: 100 * time.Millisecond, duration: 300 * time.Millisecond,
		timeout: 200 * time.Millisecond, ramp: 20 * time.Millisecond, establish: 5 * time.Second,
	}
	t.Run("first datagram of every flow dropped", func(t *testing.T) {
		var late atomic.Bool // a datagram answered after the set-up, so by the load
		addr := pickyEcho(t, func(_ *net.UDPAddr, before int) bool {
			if before >= 2 {
				late.Store(true)
			}
			return before > 0
		})
		res := runSetUpLoad(t, addr, base)
		if res.GaveUp || res.Established != base.flows || res.Busy != base.flows {
			t.Errorf("gave up %v, %d flows answered at the window's start, %d busy, want all %d", res.GaveUp, res.Established, res.Busy, base.flows)
		}
		// One retry each, after the timeout.
		if res.Setup < base.timeout || res.Setup > base.establish {
			t.Errorf("set-up took %v, want between the timeout %v and the limit %v", res.Setup, base.timeout, base.establish)
		}
		if res.Warmup < res.Setup+base.warmup {
			t.Errorf("the window started %v after the first datagram, before the set-up (%v) and the warm-up after it (%v)", res.Warmup, res.Setup, base.warmup)
		}
		if !late.Load() || res.Received == 0 {
			t.Errorf("no load after the set-up: %+v", res)
		}
	})
	t.Run("odd flows never answered", func(t *testing.T) {
		lc := base
		lc.establish = 700 * time.Millisecond
		addr := pickyEcho(t, func(src *net.UDPAddr, _ int) bool { return src.Port%2 == 0 })
		res := runSetUpLoad(t, addr, lc)
		if !res.GaveUp || res.Setup != 0 {
			t.Errorf("gave up %v, set-up %v: want given up, and no set-up time", res.GaveUp, res.Setup)
		}
		if res.Established == 0 || res.Established >= lc.flows || res.Busy != res.Established {
			t.Errorf("%d flows answered, %d busy, of %d", res.Established, res.Busy, lc.flows)
		}
		if res.Warmup < lc.establish || res.Warmup > lc.establish+lc.warmup+time.Second {
			t.Errorf("the window started %v after the first datagram, want about the limit %v + the warm-up %v", res.Warmup, lc.establish, lc.warmup)
		}
		if res.Received == 0 || res.Lost == 0 {
			t.Errorf("the load after giving up: received %d, lost %d", res.Received, res.Lost)
		}
	})
}

// runSetUpLoad runs lc against addr and checks what every load must do.
func runSetUpLoad(t *testing.T, addr string, lc loadConfig) *loadResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := runLoad(ctx, addr, lc, loadHooks{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Sent == 0 || res.Received+res.Lost != res.Sent || res.Corrupt != 0 {
		t.Errorf("sent %d, received %d, lost %d, corrupt %d", res.Sent, res.Received, res.Lost, res.Corrupt)
	}
	return res
}
