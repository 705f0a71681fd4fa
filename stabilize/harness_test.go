package stabilize

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/mholt/caddy-l4/layer4"

	"github.com/stabilize-lb/caddy-stabilize/internal/fastudp"
)

// testUpstream is a real UDP server on 127.0.0.1 that replies to every
// datagram with "<name>|<datagram>".
type testUpstream struct {
	name   string
	addr   netip.AddrPort
	conn   *net.UDPConn
	got    atomic.Int64
	silent atomic.Bool // receive but do not reply
	done   chan struct{}

	mu       sync.Mutex
	sources  map[netip.AddrPort]int // datagrams per balancer-side source
	payloads map[string]*int        // datagrams per payload
	last     []byte                 // the last datagram received
}

func startUpstream(t testing.TB, name string) *testUpstream {
	t.Helper()
	return startUpstreamAt(t, name, "127.0.0.1:0")
}

func startUpstreamAt(t testing.TB, name, addr string) *testUpstream {
	t.Helper()
	conn, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Fatalf("upstream %s: %v", name, err)
	}
	u := &testUpstream{
		name:     name,
		addr:     conn.LocalAddr().(*net.UDPAddr).AddrPort(),
		conn:     conn,
		done:     make(chan struct{}),
		sources:  make(map[netip.AddrPort]int),
		payloads: make(map[string]*int),
	}
	go u.serve()
	t.Cleanup(u.close)
	return u
}

func (u *testUpstream) serve() {
	defer close(u.done)
	buf := make([]byte, 65535)
	out := make([]byte, 0, 65535)
	for {
		n, from, err := u.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		u.got.Add(1)
		u.mu.Lock()
		u.sources[from]++
		if c := u.payloads[string(buf[:n])]; c != nil {
			*c++ // no allocation for a payload seen before
		} else {
			u.payloads[string(buf[:n])] = new(1)
		}
		u.last = append(u.last[:0], buf[:n]...)
		u.mu.Unlock()
		if u.silent.Load() {
			continue
		}
		out = append(append(append(out[:0], u.name...), '|'), buf[:n]...)
		_, _ = u.conn.WriteToUDPAddrPort(out, from)
	}
}

// close stops the server; its port then answers with ICMP port-unreachable.
func (u *testUpstream) close() {
	_ = u.conn.Close()
	<-u.done
}

// gotPayload is how many datagrams with payload p the server received.
func (u *testUpstream) gotPayload(p string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	if c := u.payloads[p]; c != nil {
		return *c
	}
	return 0
}

func (u *testUpstream) dial() string { return "udp/" + u.addr.String() }

// freeUDPPort returns a UDP port on 127.0.0.1 that was free a moment ago.
func freeUDPPort(t testing.TB) int {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// freeTCPPort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freeTCPPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// balancer is a Caddy running in this process with one layer4 server.
type balancer struct {
	addr  string // the UDP listener, 127.0.0.1:port
	admin string // the admin API, or "" when disabled
}

// testConfig is the JSON of a Caddy config with one layer4 UDP server that
// routes everything to handler (a JSON object).
func testConfig(listen string, adminAddr string, idle time.Duration, handler any) []byte {
	return testConfigOn("udp", listen, adminAddr, idle, handler)
}

// testConfigOn is testConfig with the listener on network: "udp" or
// FastNetwork.
func testConfigOn(network, listen string, adminAddr string, idle time.Duration, handler any) []byte {
	admin := map[string]any{"disabled": true}
	if adminAddr != "" {
		admin = map[string]any{"listen": adminAddr}
	}
	cfg := map[string]any{
		"admin":   admin,
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "WARN"}}},
		"apps": map[string]any{
			"layer4": map[string]any{
				"servers": map[string]any{
					"srv0": map[string]any{
						"listen":       []string{network + "/" + listen},
						"idle_timeout": idle.String(),
						"routes":       []any{map[string]any{"handle": []any{handler}}},
					},
				},
			},
		},
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		panic(err)
	}
	return b
}

// handlerConfig is a stabilize handler config for the upstreams.
func handlerConfig(per, policy string, ups ...*testUpstream) map[string]any {
	var list []any
	for _, u := range ups {
		list = append(list, map[string]any{"dial": u.dial()})
	}
	h := map[string]any{"handler": "stabilize", "upstreams": list}
	if per != "" {
		h["per"] = per
	}
	if policy != "" {
		h["load_balancing"] = map[string]any{"selection": map[string]any{"policy": policy}}
	}
	return h
}

// startBalancer loads a Caddy config with handler on a fresh port. Caddy's
// global state means these tests cannot run in parallel.
func startBalancer(t testing.TB, withAdmin bool, idle time.Duration, handler any) *balancer {
	t.Helper()
	return startBalancerOn(t, "udp", withAdmin, idle, handler)
}

// startBalancerOn is startBalancer with the listener on network.
func startBalancerOn(t testing.TB, network string, withAdmin bool, idle time.Duration, handler any) *balancer {
	t.Helper()
	b := &balancer{addr: fmt.Sprintf("127.0.0.1:%d", freeUDPPort(t))}
	if withAdmin {
		b.admin = fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t))
	}
	loadCaddy(t, testConfigOn(network, b.addr, b.admin, idle, handler))
	return b
}

// loadCaddy loads cfg into the process's Caddy, which it stops when the
// test ends.
func loadCaddy(t testing.TB, cfg []byte) {
	t.Helper()
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
}

// logToFile has the config cfg log at level and above, as JSON, to file.
func logToFile(cfg map[string]any, level, file string) {
	cfg["logging"] = map[string]any{"logs": map[string]any{"default": map[string]any{
		"level":   level,
		"writer":  map[string]any{"output": "file", "filename": file},
		"encoder": map[string]any{"format": "json"},
	}}}
}

// client is one client flow: its own socket, so its own source port.
type client struct {
	t    testing.TB
	conn *net.UDPConn
	buf  []byte
}

func newClient(t testing.TB, to string) *client {
	t.Helper()
	raddr, err := net.ResolveUDPAddr("udp", to)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.DialUDP("udp", nil, raddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &client{t: t, conn: conn, buf: make([]byte, 65535)}
}

// roundTrip sends payload and returns the upstream name and the echoed
// payload of the reply.
func (c *client) roundTrip(payload []byte, timeout time.Duration) (string, []byte, error) {
	if _, err := c.conn.Write(payload); err != nil {
		return "", nil, err
	}
	for {
		if err := c.conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
			return "", nil, err
		}
		n, err := c.conn.Read(c.buf)
		if err != nil {
			return "", nil, err
		}
		name, echo, ok := bytes.Cut(c.buf[:n], []byte("|"))
		if !ok {
			return "", nil, fmt.Errorf("malformed reply %q", c.buf[:n])
		}
		if !bytes.Equal(echo, payload) {
			continue // a late reply to an earlier request
		}
		return string(name), echo, nil
	}
}

// mustRoundTrip is roundTrip that fails the test on error.
func (c *client) mustRoundTrip(payload string) string {
	c.t.Helper()
	name, _, err := c.roundTrip([]byte(payload), 2*time.Second)
	if err != nil {
		c.t.Fatalf("round trip %q: %v", payload, err)
	}
	return name
}

// eventually polls cond until it holds or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count fds: %v", err)
	}
	return len(ents)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func counts(names []string) string {
	m := map[string]int{}
	for _, n := range names {
		m[n]++
	}
	var sb strings.Builder
	fmt.Fprint(&sb, m)
	return sb.String()
}

// fastSocketAt returns the open fastudp socket at addr.
func fastSocketAt(t testing.TB, addr string) *fastudp.Socket {
	t.Helper()
	for _, s := range fastudp.Sockets() {
		if s.Key() == addr {
			return s
		}
	}
	t.Fatalf("no fastudp socket at %s", addr)
	return nil
}
