package udpclient

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/udpecho"
)

// echoServer starts a udpecho server on a free loopback port for the test.
func echoServer(t *testing.T) *udpecho.Server {
	t.Helper()
	s, err := udpecho.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// run calls Run with a deadline, so that a broken client fails the test
// instead of hanging it.
func run(t *testing.T, cfg Config) Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if ctx.Err() != nil {
		t.Fatal("Run did not finish in time")
	}
	return res
}

func TestRunFlows(t *testing.T) {
	s := echoServer(t)
	var mu sync.Mutex
	seqs := map[int][]int{} // per flow, the seqs of the replies in order
	res := run(t, Config{
		Target: s.Name(), Flows: 3, Count: 50, Size: 8000,
		OnReply: func(r Reply) {
			mu.Lock()
			defer mu.Unlock()
			seqs[r.Flow] = append(seqs[r.Flow], r.Seq)
			if r.Server != s.Name() || r.RTT <= 0 {
				t.Errorf("reply %+v, want server %s and a positive RTT", r, s.Name())
			}
		},
	})

	if res.Sent != 150 || res.Received != 150 || res.Missing() != 0 || res.Stale != 0 || res.Corrupt != 0 {
		t.Errorf("totals %+v, want 150 sent and received", res.Stats)
	}
	if len(res.PerServer) != 1 || res.PerServer[s.Name()] != 150 {
		t.Errorf("PerServer = %v, want %s=150", res.PerServer, s.Name())
	}
	if s.Received() != 150 {
		t.Errorf("server received %d, want 150", s.Received())
	}
	locals := map[string]bool{}
	for i, f := range res.Flows {
		locals[f.Local] = true
		if f.Sent != 50 || f.Received != 50 || f.PerServer[s.Name()] != 50 {
			t.Errorf("flow %d: %+v, want 50 sent and received", i, f)
		}
		for j, seq := range seqs[i] {
			if seq != j {
				t.Fatalf("flow %d: reply %d has seq %d", i, j, seq)
			}
		}
	}
	if len(locals) != 3 {
		t.Errorf("flows' source addresses %v, want 3 different", locals)
	}
}

func TestRunSilentServer(t *testing.T) {
	s := echoServer(t)
	s.SetSilent(true)
	res := run(t, Config{Target: s.Name(), Count: 3, Timeout: 50 * time.Millisecond})
	if res.Sent != 3 || res.Received != 0 || res.Missing() != 3 || len(res.PerServer) != 0 {
		t.Errorf("result %+v, want 3 sent and 3 missing", res.Stats)
	}
	if s.Received() != 3 {
		t.Errorf("server received %d, want 3", s.Received())
	}
}

func TestRunNoServer(t *testing.T) {
	s := echoServer(t)
	s.Close() // a port that was just free and that nobody listens on now
	res := run(t, Config{Target: s.Name(), Count: 3, Timeout: 50 * time.Millisecond})
	if res.Sent != 3 || res.Missing() != 3 {
		t.Errorf("result %+v, want 3 sent and 3 missing", res.Stats)
	}
}

// TestRunStaleAndCorrupt talks to a server that, before the right reply to a
// request, repeats its reply to the previous request (stale), sends a reply
// with no identity and one that echoes another flow's request (corrupt).
func TestRunStaleAndCorrupt(t *testing.T) {
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	go func() {
		var prev []byte
		buf := make([]byte, 2048)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			req := "me|" + string(buf[:n])
			replies := []string{"junk", "me|1" + req[4:], req}
			if prev != nil {
				replies = append([]string{string(prev)}, replies...)
			}
			for _, r := range replies {
				conn.WriteToUDPAddrPort([]byte(r), from)
			}
			prev = []byte(req)
		}
	}()

	res := run(t, Config{Target: conn.LocalAddr().String(), Count: 5, Size: 100})
	want := Stats{Sent: 5, Received: 5, Stale: 4, Corrupt: 10, PerServer: map[string]int{"me": 5}}
	if res.Sent != want.Sent || res.Received != want.Received || res.Stale != want.Stale ||
		res.Corrupt != want.Corrupt || len(res.PerServer) != 1 || res.PerServer["me"] != 5 {
		t.Errorf("result %+v, want %+v", res.Stats, want)
	}
}

func TestRunDurationAndInterval(t *testing.T) {
	s := echoServer(t)
	res := run(t, Config{Target: s.Name(), Duration: 200 * time.Millisecond, Interval: 20 * time.Millisecond})
	if res.Sent < 5 || res.Sent > 11 || res.Missing() != 0 {
		t.Errorf("result %+v, want about 10 sent and none missing", res.Stats)
	}
	if res.Elapsed < 200*time.Millisecond {
		t.Errorf("elapsed %v, want at least the duration", res.Elapsed)
	}
}

func TestRunCancel(t *testing.T) {
	s := echoServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	res, err := Run(ctx, Config{Target: s.Name(), Flows: 2, Duration: time.Hour, Interval: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("Run returned %v after the cancel", elapsed)
	}
	if res.Sent == 0 || res.Missing() > 2 {
		t.Errorf("result %+v, want some sent and at most one missing per flow", res.Stats)
	}
}

func TestRunConfigErrors(t *testing.T) {
	for name, cfg := range map[string]Config{
		"no Count or Duration": {Target: "127.0.0.1:9"},
		"bad target":           {Target: "127.0.0.1", Count: 1},
	} {
		if _, err := Run(context.Background(), cfg); err == nil {
			t.Errorf("%s: Run returned no error", name)
		}
	}
}
