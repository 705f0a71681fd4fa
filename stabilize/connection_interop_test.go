package stabilize

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// The interop tests run ngtcp2's example programs, an independent QUIC
// implementation in C (Debian packages ngtcp2-server and ngtcp2-client),
// and skip when they are not installed.
const (
	ngtcp2Server = "gtlsserver"
	ngtcp2Client = "gtlsclient"
)

func lookNgtcp2(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		for _, dir := range []string{"/usr/sbin", "/usr/bin"} {
			if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
				return filepath.Join(dir, name)
			}
		}
		t.Skipf("%s not installed (apt-get install ngtcp2-server ngtcp2-client)", name)
	}
	return path
}

// startNgtcp2Servers starts n ngtcp2 HTTP/3 servers named s0, s1, ...,
// which know nothing of QUIC-LB; each serves /name, its name.
func startNgtcp2Servers(t *testing.T, n int) []string {
	t.Helper()
	bin := lookNgtcp2(t, ngtcp2Server)
	dir := t.TempDir()
	pki := newTestPKI(t)
	key, cert := pki.keyFile, pki.certFile
	var dials []string
	for i := range n {
		docs := filepath.Join(dir, fmt.Sprintf("s%d", i))
		if err := os.Mkdir(docs, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(docs, "name"), fmt.Appendf(nil, "s%d", i), 0o644); err != nil {
			t.Fatal(err)
		}
		port := freeUDPPort(t)
		ctx, cancel := context.WithCancel(context.Background())
		cmd := exec.CommandContext(ctx, bin, "-q", "--timeout=30s", "-d", docs, "127.0.0.1", fmt.Sprint(port), key, cert)
		if err := cmd.Start(); err != nil {
			cancel()
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cancel()
			_ = cmd.Wait()
		})
		dials = append(dials, fmt.Sprintf("udp/127.0.0.1:%d", port))
	}
	time.Sleep(200 * time.Millisecond) // let them bind
	return dials
}

// TestConnectionInteropServers balances quic-go HTTP/3 clients over ngtcp2
// servers, which know nothing of QUIC-LB: the connections stay on the
// learned path through a NAT rebinding.
func TestConnectionInteropServers(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		dials := startNgtcp2Servers(t, 2)
		var ups []any
		for _, d := range dials {
			ups = append(ups, map[string]any{"dial": d})
		}
		lb := startBalancerOn(t, network, false, 30*time.Second,
			map[string]any{"handler": "stabilize", "per": PerConnection, "upstreams": ups})
		used := map[string]bool{}
		for i := range 2 {
			r := startRelay(t, lb.addr)
			c := dialH3(t, r.addr())
			// A few requests first: a client may switch to a connection
			// ID from a NEW_CONNECTION_ID frame after the handshake, which
			// the balancer learns when the client first uses it.
			var first string
			for j := range 3 {
				got, err := c.getPath("/name", 5*time.Second)
				if err != nil || j > 0 && got != first {
					t.Fatalf("connection %d: %q, %v; want %q", i, got, err, first)
				}
				first = got
			}
			r.rebind()
			for range 2 {
				got, err := c.getPath("/name", 5*time.Second)
				if err != nil || got != first {
					t.Fatalf("connection %d after rebinding: %q, %v; want %q", i, got, err, first)
				}
			}
			used[first] = true
		}
		if len(used) != 2 {
			t.Errorf("round robin over 2 servers, 2 connections: %v", used)
		}
	})
}

// TestConnectionInteropClient runs the ngtcp2 client through the balancer
// to quic-go servers with QUIC-LB. After the handshake it changes its local
// address, either as a NAT rebinding (same connection ID) or as an active
// migration (a new connection ID and path validation), and only then sends
// its request. Through `per connection` the request completes; through
// `per flow` (the control) it does not.
func TestConnectionInteropClient(t *testing.T) {
	bin := lookNgtcp2(t, ngtcp2Client)
	forNetworks(t, func(t *testing.T, network string) {
		for _, tc := range []struct {
			name, per string
			rebind    bool
			completes bool
		}{
			{"rebinding", PerConnection, true, true},
			{"migration", PerConnection, false, true},
			{"per_flow_rebinding", PerFlow, true, false},
		} {
			t.Run(tc.name, func(t *testing.T) {
				tr := trackHandlers(t)
				servers := startH3Servers(t, 2, h3Options{quicLB: true})
				lb := startBalancerOn(t, network, false, 30*time.Second,
					h3Handler(tc.per, "round_robin", tc.per == PerConnection, servers...))
				host, port, _ := net.SplitHostPort(lb.addr)
				dl := t.TempDir()
				args := []string{"-q", "--exit-on-all-streams-close", "--timeout=3s", "--change-local-addr=100ms",
					"--delay-stream=400ms", "--download=" + dl, host, port, "https://" + lb.addr + "/name"}
				if tc.rebind {
					args = append([]string{"--nat-rebinding"}, args...)
				}
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
				defer cancel()
				out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
				got, rerr := os.ReadFile(filepath.Join(dl, "name"))
				completed := rerr == nil && (string(got) == servers[0].name || string(got) == servers[1].name)
				if completed != tc.completes {
					t.Fatalf("completed %t, want %t: body %q (%v); client: %v\n%s", completed, tc.completes, got, rerr, err, out)
				}
				h := tr.latest()
				h.mu.Lock()
				flows := len(h.flows)
				h.mu.Unlock()
				if flows < 2 {
					t.Errorf("the balancer saw %d client flows, want 2: the client did not change its address", flows)
				}
			})
		}
	})
}
