package stabilize

import (
	"bytes"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"weak"
)

// networks are the listener networks every behaviour test runs on.
var networks = []string{"udp", FastNetwork}

// granularities are the values of `per` every granularity test runs on.
// Their datagrams are not QUIC, which `per connection` routes as `per flow`.
var granularities = []string{PerPacket, PerFlow, PerConnection}

// forNetworks runs body as one subtest per listener network, named after it.
func forNetworks(t *testing.T, body func(t *testing.T, network string)) {
	t.Helper()
	for _, network := range networks {
		t.Run(network, func(t *testing.T) { body(t, network) })
	}
}

// forPaths runs body as one subtest per listener network and granularity,
// named "udp/flow", "fastudp/packet" and so on.
func forPaths(t *testing.T, pers []string, body func(t *testing.T, network, per string)) {
	t.Helper()
	for _, network := range networks {
		for _, per := range pers {
			t.Run(network+"/"+per, func(t *testing.T) { body(t, network, per) })
		}
	}
}

// startWithOne starts upstream "a" and a balancer on network with
// handlerConfig(per, "", a) and the extra handler fields, and returns them
// with the handler provisioned.
func startWithOne(t *testing.T, network, per string, extra map[string]any) (*testUpstream, *balancer, *Handler) {
	t.Helper()
	tr := trackHandlers(t)
	a := startUpstream(t, "a")
	h := handlerConfig(per, "", a)
	maps.Copy(h, extra)
	lb := startBalancerOn(t, network, false, 30*time.Second, h)
	return a, lb, tr.latest()
}

// rawUpstream is a UDP server on 127.0.0.1 that echoes every datagram as is
// (or stays silent) and can record every datagram it receives, in order.
type rawUpstream struct {
	addr   netip.AddrPort
	conn   *net.UDPConn
	got    atomic.Int64
	echo   atomic.Bool
	record atomic.Bool
	done   chan struct{}

	mu        sync.Mutex
	datagrams [][]byte                // every datagram, while record is set
	sources   map[netip.AddrPort]bool // balancer-side sources seen
}

func startRawUpstream(t testing.TB, echo, record bool) *rawUpstream {
	t.Helper()
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("raw upstream: %v", err)
	}
	u := &rawUpstream{
		addr:    conn.LocalAddr().(*net.UDPAddr).AddrPort(),
		conn:    conn,
		done:    make(chan struct{}),
		sources: make(map[netip.AddrPort]bool),
	}
	u.echo.Store(echo)
	u.record.Store(record)
	go u.serve()
	t.Cleanup(func() {
		_ = u.conn.Close()
		<-u.done
	})
	return u
}

func (u *rawUpstream) serve() {
	defer close(u.done)
	buf := make([]byte, 65535)
	for {
		n, from, err := u.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		u.mu.Lock()
		u.sources[from] = true
		if u.record.Load() {
			u.datagrams = append(u.datagrams, bytes.Clone(buf[:n]))
		}
		u.mu.Unlock()
		u.got.Add(1) // after recording, so a waiter sees the datagram
		if u.echo.Load() {
			_, _ = u.conn.WriteToUDPAddrPort(buf[:n], from)
		}
	}
}

func (u *rawUpstream) dial() string { return "udp/" + u.addr.String() }

// recorded is a copy of the datagrams recorded so far.
func (u *rawUpstream) recorded() [][]byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([][]byte(nil), u.datagrams...)
}

// sourceCount is how many balancer-side source addresses u has seen.
func (u *rawUpstream) sourceCount() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.sources)
}

// rawHandler is a stabilize handler config for raw upstreams.
func rawHandler(per string, ups ...*rawUpstream) map[string]any {
	var list []any
	for _, u := range ups {
		list = append(list, map[string]any{"dial": u.dial()})
	}
	return map[string]any{"handler": "stabilize", "upstreams": list, "per": per}
}

// sourcesOf is how many balancer-side source addresses u has seen.
func sourcesOf(u *testUpstream) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.sources)
}

// childEnv names the test a child process of inChild runs.
const childEnv = "STABILIZE_TEST_CHILD"

// inChild runs the calling test again in a child process of the test binary
// and reports its result here, so that a panic in one of the package's
// goroutines, which ends the process, fails this test only and not the whole
// suite. It returns true in the child, which then runs the test's body.
func inChild(t *testing.T) bool {
	t.Helper()
	if os.Getenv(childEnv) == t.Name() {
		return true
	}
	var pattern []string
	for _, part := range strings.Split(t.Name(), "/") {
		pattern = append(pattern, "^"+regexp.QuoteMeta(part)+"$")
	}
	cmd := exec.Command(os.Args[0], "-test.run="+strings.Join(pattern, "/"), "-test.count=1",
		"-test.v", "-test.timeout=2m")
	cmd.Env = append(os.Environ(), childEnv+"="+t.Name())
	runChild(t, cmd)
	return false
}

// runChild runs cmd, the test in a child process, and fails the test if
// it fails there or did not run.
func runChild(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	out, err := cmd.CombinedOutput()
	if err != nil {
		const tail = 6000
		if len(out) > tail {
			out = out[len(out)-tail:]
		}
		t.Errorf("the test, run in a child process, failed (%v):\n%s", err, out)
		return
	}
	if !bytes.Contains(out, []byte("--- PASS: "+t.Name())) {
		t.Errorf("the child process did not run the test:\n%s", out)
	}
}

// affinityEntries is how many flows the package-level affinity tables
// remember, over every handler identity.
func affinityEntries() int {
	n := 0
	affinities.Range(func(_, v any) bool {
		a := v.(*affinity)
		a.mu.Lock()
		n += len(a.m)
		a.mu.Unlock()
		return true
	})
	return n
}

// handlerTracker holds weak pointers to every handler provisioned, to tell
// which ones have been garbage collected.
type handlerTracker struct {
	mu sync.Mutex
	hs []weak.Pointer[Handler]
}

// trackHandlers records the handlers provisioned from now on without keeping
// them reachable. Call it before the balancer starts.
func trackHandlers(t *testing.T) *handlerTracker {
	t.Helper()
	tr := new(handlerTracker)
	handlerProvisioned = func(h *Handler) {
		tr.mu.Lock()
		tr.hs = append(tr.hs, weak.Make(h))
		tr.mu.Unlock()
	}
	t.Cleanup(func() { handlerProvisioned = nil })
	return tr
}

// latest is the newest handler provisioned, or nil.
func (tr *handlerTracker) latest() *Handler {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.hs) == 0 {
		return nil
	}
	return tr.hs[len(tr.hs)-1].Value()
}

// live is how many of the handlers provisioned so far are still reachable,
// and how many were provisioned.
func (tr *handlerTracker) live() (live, total int) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, w := range tr.hs {
		if w.Value() != nil {
			live++
		}
	}
	return live, len(tr.hs)
}
