package stabilize

import (
	"context"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/stabilize-lb/caddy-stabilize/internal/quicwire"
	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

// testQUICLB is the QUIC-LB configuration of the tests: a 2-octet server
// ID, a 6-octet nonce and a key, so the four-pass algorithm.
var testQUICLB = quiclb.Config{ID: 1, ServerIDLen: 2, NonceLen: 6, Key: []byte("stabilize quiclb")}

// quicLBJSON is testQUICLB as the handler's quic_lb.
func quicLBJSON() []any {
	return []any{map[string]any{
		"config_id":        int(testQUICLB.ID),
		"server_id_length": testQUICLB.ServerIDLen,
		"nonce_length":     testQUICLB.NonceLen,
		"key":              hex.EncodeToString(testQUICLB.Key),
	}}
}

// h3Server is an HTTP/3 server on 127.0.0.1 that answers every request with
// its name.
type h3Server struct {
	name     string
	serverID []byte // QUIC-LB server ID, or nil
	addr     *net.UDPAddr
	conns    atomic.Int64 // connections accepted

	mu       sync.Mutex
	initials map[string]bool // DCIDs of the client Initials received
}

// initialDCIDs are the DCIDs of the client Initials s received.
func (s *h3Server) initialDCIDs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Collect(maps.Keys(s.initials))
}

// serverConn records the DCIDs of the Initials a server reads. Embedding
// the interface keeps quic-go on ReadFrom.
type serverConn struct {
	net.PacketConn
	s *h3Server
}

func (c serverConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, addr, err := c.PacketConn.ReadFrom(b)
	if err == nil {
		if h, perr := quicwire.ParseLong(b[:n]); perr == nil {
			if typ, terr := h.Type(); terr == nil && typ == quicwire.PacketTypeInitial {
				c.s.mu.Lock()
				c.s.initials[string(h.DCID)] = true
				c.s.mu.Unlock()
			}
		}
	}
	return n, addr, err
}

// SetReadBuffer and SetWriteBuffer silence quic-go's buffer size warnings.
func (c serverConn) SetReadBuffer(int) error  { return nil }
func (c serverConn) SetWriteBuffer(int) error { return nil }

// h3Options are how the test servers run.
type h3Options struct {
	quicLB bool // issue QUIC-LB connection IDs (server ID i+1)
	retry  bool // validate client addresses with Retry
}

// startH3Servers starts n HTTP/3 servers named s0, s1, ...
func startH3Servers(t *testing.T, n int, opts h3Options) []*h3Server {
	t.Helper()
	tlsConf := testServerTLS(t)
	var servers []*h3Server
	for i := range n {
		s := &h3Server{name: fmt.Sprintf("s%d", i), initials: make(map[string]bool)}
		conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		s.addr = conn.LocalAddr().(*net.UDPAddr)
		tr := &quic.Transport{Conn: serverConn{conn, s}}
		if opts.quicLB {
			s.serverID = []byte{0, byte(i + 1)}
			gen, err := quiclb.NewGenerator(testQUICLB, s.serverID)
			if err != nil {
				t.Fatal(err)
			}
			tr.ConnectionIDGenerator = gen
		}
		if opts.retry {
			tr.VerifySourceAddress = func(net.Addr) bool { return true }
		}
		ln, err := tr.ListenEarly(http3.ConfigureTLSConfig(tlsConf), &quic.Config{MaxIdleTimeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		srv := &http3.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			_, _ = io.WriteString(w, s.name)
		})}
		counted := &countingListener{EarlyListener: ln, n: &s.conns}
		go func() { _ = srv.ServeListener(counted) }()
		t.Cleanup(func() {
			_ = srv.Close()
			_ = tr.Close()
			_ = conn.Close()
		})
		servers = append(servers, s)
	}
	return servers
}

// countingListener counts the connections a server accepts.
type countingListener struct {
	*quic.EarlyListener
	n *atomic.Int64
}

func (l *countingListener) Accept(ctx context.Context) (*quic.Conn, error) {
	c, err := l.EarlyListener.Accept(ctx)
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func (s *h3Server) dial() string { return "udp/" + s.addr.String() }

// h3Handler is a stabilize handler config for the servers; with quicLB,
// each upstream has its server ID.
func h3Handler(per, policy string, quicLB bool, servers ...*h3Server) map[string]any {
	var list []any
	for _, s := range servers {
		u := map[string]any{"dial": s.dial()}
		if quicLB && s.serverID != nil {
			u["server_id"] = hex.EncodeToString(s.serverID)
		}
		list = append(list, u)
	}
	h := map[string]any{"handler": "stabilize", "per": per, "upstreams": list}
	if policy != "" {
		h["load_balancing"] = map[string]any{"selection": map[string]any{"policy": policy}}
	}
	if quicLB {
		h["quic_lb"] = quicLBJSON()
	}
	return h
}

// testServerTLS returns a TLS config with the package's test certificate.
func testServerTLS(t *testing.T) *tls.Config {
	t.Helper()
	return &tls.Config{Certificates: []tls.Certificate{newTestPKI(t).cert}}
}

// h3Client is one QUIC connection with an HTTP/3 client on it.
type h3Client struct {
	t    *testing.T
	tr   *quic.Transport
	conn *quic.Conn
	cc   *http3.ClientConn
}

// dialH3 connects to addr from a fresh socket.
func dialH3(t *testing.T, addr string) *h3Client {
	t.Helper()
	return dialH3From(t, listenLocalUDP(t), addr)
}

// dialH3From connects to addr from pc.
func dialH3From(t *testing.T, pc net.PacketConn, addr string) *h3Client {
	t.Helper()
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: pc}
	t.Cleanup(func() { _ = tr.Close() })
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{http3.NextProtoH3}}
	conn, err := tr.Dial(ctx, raddr, tlsConf, &quic.Config{MaxIdleTimeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = conn.CloseWithError(0, "") })
	return &h3Client{t: t, tr: tr, conn: conn, cc: (&http3.Transport{}).NewClientConn(conn)}
}

// get requests / and returns the name of the server that answered.
func (c *h3Client) get(timeout time.Duration) (string, error) {
	return c.getPath("/", timeout)
}

// getPath requests path and returns the body of the reply.
func (c *h3Client) getPath(path string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(c.t.Context(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://127.0.0.1"+path, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.cc.RoundTrip(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// mustGet is get that fails the test on error.
func (c *h3Client) mustGet() string {
	c.t.Helper()
	name, err := c.get(5 * time.Second)
	if err != nil {
		c.t.Fatalf("request: %v", err)
	}
	return name
}

func listenLocalUDP(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// relay is a UDP relay between one client and balancers, like a NAT: the
// client sends to addr; the relay sends on from its current outside socket,
// to the targets in turn, and relays every reply back to the client.
// rebind replaces the outside socket, as a NAT rebinding does.
type relay struct {
	t       *testing.T
	in      *net.UDPConn
	targets []*net.UDPAddr

	mu     sync.Mutex
	out    *net.UDPConn
	client *net.UDPAddr
	next   int
}

func startRelay(t *testing.T, targets ...string) *relay {
	t.Helper()
	r := &relay{t: t, in: listenLocalUDP(t)}
	for _, a := range targets {
		ua, err := net.ResolveUDPAddr("udp", a)
		if err != nil {
			t.Fatal(err)
		}
		r.targets = append(r.targets, ua)
	}
	r.rebind()
	go r.forward()
	return r
}

func (r *relay) addr() string { return r.in.LocalAddr().String() }

// rebind moves the relay to a new outside socket and closes the old one.
func (r *relay) rebind() {
	out := listenLocalUDP(r.t)
	r.mu.Lock()
	old := r.out
	r.out = out
	r.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
	go r.back(out)
}

// port is the outside socket's port.
func (r *relay) port() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.out.LocalAddr().(*net.UDPAddr).Port
}

func (r *relay) forward() {
	buf := make([]byte, 65535)
	for {
		n, from, err := r.in.ReadFromUDP(buf)
		if err != nil {
			return
		}
		r.mu.Lock()
		r.client = from
		out, to := r.out, r.targets[r.next%len(r.targets)]
		r.next++
		r.mu.Unlock()
		_, _ = out.WriteToUDP(buf[:n], to)
	}
}

func (r *relay) back(out *net.UDPConn) {
	buf := make([]byte, 65535)
	for {
		n, err := out.Read(buf)
		if err != nil {
			return
		}
		r.mu.Lock()
		client := r.client
		r.mu.Unlock()
		if client != nil {
			_, _ = r.in.WriteToUDP(buf[:n], client)
		}
	}
}
