package stabilize

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/filestorage"
	"github.com/quic-go/quic-go"
)

// startQUICWithTLSApp starts a balancer on network whose handler takes its
// certificate from the tls app configured as tlsApp; pkiApp may be nil.
func startQUICWithTLSApp(t *testing.T, network string, handler map[string]any, tlsApp, pkiApp any, storage string) *balancer {
	t.Helper()
	return startQUICWithTLSAppAt(t, listenAddr(t), network, handler, tlsApp, pkiApp, storage)
}

// startQUICWithTLSAppAt is startQUICWithTLSApp listening on addr.
func startQUICWithTLSAppAt(t *testing.T, addr, network string, handler map[string]any, tlsApp, pkiApp any, storage string) *balancer {
	t.Helper()
	q := handler["quic"].(map[string]any)
	delete(q, "certificate")
	delete(q, "key")
	b := &balancer{addr: addr}
	var cfg map[string]any
	if err := json.Unmarshal(testConfigOn(network, b.addr, "", 30*time.Second, handler), &cfg); err != nil {
		t.Fatal(err)
	}
	apps := cfg["apps"].(map[string]any)
	apps["tls"] = tlsApp
	if pkiApp != nil {
		apps["pki"] = pkiApp
	}
	cfg["storage"] = map[string]any{"module": "file_system", "root": storage}
	raw, _ := json.Marshal(cfg)
	if err := caddy.Load(raw, true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	return b
}

// loadFilesApp is a tls app config that loads the test certificate.
func loadFilesApp(p *testPKI) map[string]any {
	return map[string]any{"certificates": map[string]any{"load_files": []any{
		map[string]any{"certificate": p.certFile, "key": p.keyFile},
	}}}
}

func listenAddr(t *testing.T) string {
	return net.JoinHostPort("127.0.0.1", itoa(int64(freeUDPPort(t))))
}

// TestQUICCertificates serves certificates from the tls app: one Caddy's
// internal issuer makes for localhost, and one loaded from files.
func TestQUICCertificates(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		t.Run("internal", func(t *testing.T) {
			b := startQUICBackend(t, "a")
			storage := t.TempDir()
			lb := startQUICWithTLSApp(t, network, quicHandler(t, "", "", nil, b.dial()),
				map[string]any{
					"certificates": map[string]any{"automate": []string{"localhost"}},
					"automation": map[string]any{"policies": []any{map[string]any{
						"subjects": []string{"localhost"},
						"issuers":  []any{map[string]any{"module": "internal"}},
					}}},
				},
				map[string]any{"certificate_authorities": map[string]any{"local": map[string]any{"install_trust": false}}},
				storage)
			var root []byte
			eventually(t, 10*time.Second, "the internal CA's root", func() bool {
				var err error
				root, err = os.ReadFile(filepath.Join(storage, "pki", "authorities", "local", "root.crt"))
				return err == nil
			})
			pool := x509.NewCertPool()
			pool.AppendCertsFromPEM(root)
			tlsConf := quicClientTLS(t)
			tlsConf.RootCAs = pool
			var c *quic.Conn
			eventually(t, 10*time.Second, "a handshake with the managed certificate", func() bool {
				var err error
				c, err = dialQUICErr(lb.addr, nil, tlsConf)
				return err == nil
			})
			defer c.CloseWithError(0, "")
			if name := mustExchange(t, c, []byte("managed")); name != "a" {
				t.Fatalf("reply from %q", name)
			}
			if issuer := c.ConnectionState().TLS.PeerCertificates[0].Issuer.CommonName; issuer == "localhost" || issuer == "" {
				t.Fatalf("certificate issued by %q", issuer)
			}
		})
		t.Run("files", func(t *testing.T) {
			b := startQUICBackend(t, "a")
			p := newTestPKI(t)
			lb := startQUICWithTLSApp(t, network, quicHandler(t, "", "", nil, b.dial()),
				loadFilesApp(p), nil, t.TempDir())
			tlsConf := quicClientTLS(t)
			tlsConf.ClientSessionCache = tls.NewLRUClientSessionCache(4)
			c := dialQUIC(t, lb.addr, nil, tlsConf)
			mustExchange(t, c, []byte("loaded"))
			time.Sleep(100 * time.Millisecond) // the session ticket
			_ = c.CloseWithError(0, "")
			// The tls app's session ticket keys outlive a reload, so the
			// client resumes through the next config's handler.
			reloaded := quicHandler(t, "", "", map[string]any{"max_idle_timeout": "20s"}, b.dial())
			lb.addr = startQUICWithTLSAppAt(t, lb.addr, network, reloaded, loadFilesApp(p), nil, t.TempDir()).addr
			c = dialQUIC(t, lb.addr, nil, tlsConf)
			mustExchange(t, c, []byte("resumed"))
			if !c.ConnectionState().TLS.DidResume {
				t.Fatal("the client did not resume after a reload")
			}
		})
	})
}

// TestQUICHandshakeFailures: a client offering only an unknown ALPN, or
// asking for a name without a certificate, fails its handshake with a TLS
// alert, counted by reason; the balancer goes on serving.
func TestQUICHandshakeFailures(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		tr := trackHandlers(t)
		b := startQUICBackend(t, "a")
		p := newTestPKI(t)
		lb := startQUICWithTLSApp(t, network, quicHandler(t, "", "", nil, b.dial()),
			loadFilesApp(p), nil, t.TempDir())
		h := tr.latest()

		_, err := dialQUICErr(lb.addr, nil, quicClientTLS(t, "not-offered"))
		var te *quic.TransportError
		if !errors.As(err, &te) || !te.Remote || te.ErrorCode != quic.TransportErrorCode(0x100+120) {
			t.Fatalf("dialing with a wrong ALPN: %v, want the no_application_protocol alert", err)
		}
		if n := h.QUIC.stats.failed[quicFailALPN].Load(); n != 1 {
			t.Fatalf("ALPN failures counted: %d, want 1", n)
		}

		tlsConf := quicClientTLS(t)
		tlsConf.ServerName = "unknown.example"
		_, err = dialQUICErr(lb.addr, nil, tlsConf)
		if !errors.As(err, &te) || !te.Remote || !te.ErrorCode.IsCryptoError() {
			t.Fatalf("dialing an unknown name: %v, want a TLS alert", err)
		}
		if n := h.QUIC.stats.failed[quicFailCertificate].Load(); n != 1 {
			t.Fatalf("certificate failures counted: %d, want 1", n)
		}
		c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		mustExchange(t, c, []byte("still serving"))
	})
}

// TestQUICGarbage: random datagrams, truncated Initials and datagrams of
// the listener's buffer size, from many client ports, neither panic nor
// stall the transport.
func TestQUICGarbage(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		_, lb, c := startQUICRelay(t, network)
		for i := range 50 {
			g := newClient(t, lb.addr)
			for _, n := range []int{1, 7, 40, 1200, 1500, ListenerBufferSize} {
				d := make([]byte, n)
				_, _ = rand.Read(d)
				if i%2 == 0 && n >= 7 {
					// A long header Initial of QUIC v1, cut short.
					d[0] = 0xc0 | d[0]&0x0f
					binary.BigEndian.PutUint32(d[1:], 1)
					if n > 5 {
						d[5] = 8
					}
				}
				_, _ = g.conn.Write(d)
			}
		}
		mustExchange(t, c, []byte("still serving"))
		c2 := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
		mustExchange(t, c2, []byte("new connection"))
	})
}

// TestQUICBackendResumption: a backend connection resumes the TLS session
// of an earlier one to the same upstream, also after a reload that keeps
// the backend TLS settings; after a reload that changes them (another
// trust pool, or no verification) the next one is a full handshake.
func TestQUICBackendResumption(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		p := newTestPKI(t)
		b := startQUICBackend(t, "a")
		handler := func(extra map[string]any) map[string]any {
			return quicHandler(t, "", "", extra, b.dial())
		}
		insecure := handler(map[string]any{"tls_insecure_skip_verify": true})
		delete(insecure["quic"].(map[string]any), "tls_trust_pool")
		lb := startBalancerOn(t, network, false, 30*time.Second, handler(nil))
		load := func(h map[string]any) {
			t.Helper()
			if err := caddy.Load(testConfigOn(network, lb.addr, "", 30*time.Second, h), true); err != nil {
				t.Fatal(err)
			}
		}
		// relay relays one connection and reports whether its backend
		// leg resumed; then it waits for the backend's session ticket.
		relay := func() bool {
			t.Helper()
			c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
			mustExchange(t, c, []byte("hi"))
			_ = c.CloseWithError(0, "")
			b.mu.Lock()
			resumed := b.resumed[len(b.resumed)-1]
			b.mu.Unlock()
			host := hostOf(t, b.addr)
			eventually(t, 5*time.Second, "a session ticket from the backend", func() bool {
				host.quicSessions.mu.Lock()
				defer host.quicSessions.mu.Unlock()
				_, ok := host.quicSessions.caches[0].Get(b.addr.Addr().String())
				return ok
			})
			return resumed
		}
		steps := []struct {
			name   string
			reload map[string]any // the next config's handler, or nil
			want   bool
		}{
			{"first", nil, false},
			{"second", nil, true},
			{"reload, same settings", handler(nil), true},
			{"reload, another trust pool", handler(map[string]any{"tls_trust_pool": map[string]any{
				"provider": "file", "pem_files": []string{p.caFile, p.certFile}}}), false},
			{"after it", nil, true},
			{"reload, no verification", insecure, false},
			{"reload, back to the first settings", handler(nil), true},
		}
		for _, s := range steps {
			if s.reload != nil {
				load(s.reload)
			}
			if got := relay(); got != s.want {
				t.Fatalf("%s: the backend connection resumed: %t, want %t", s.name, got, s.want)
			}
		}
	})
}

// TestBackendSessionCaches: equal TLS settings share a session cache,
// across configs; any difference gets another; a host keeps a few.
func TestBackendSessionCaches(t *testing.T) {
	p := newTestPKI(t)
	leafPool := x509.NewCertPool()
	leafPool.AddCert(p.cert.Leaf)
	otherPool := x509.NewCertPool()
	var s backendSessions
	base := &tls.Config{ServerName: "a", RootCAs: p.pool}
	first := s.cache(base)
	if s.cache(&tls.Config{ServerName: "a", RootCAs: p.pool.Clone()}) != first {
		t.Fatal("equal settings, another cache")
	}
	others := []*tls.Config{
		{ServerName: "b", RootCAs: p.pool},
		{ServerName: "a", RootCAs: leafPool},
		{ServerName: "a", RootCAs: otherPool},
		{ServerName: "a"},
		{ServerName: "a", RootCAs: p.pool, InsecureSkipVerify: true},
	}
	seen := map[tls.ClientSessionCache]bool{first: true}
	for _, c := range others {
		got := s.cache(c)
		if seen[got] {
			t.Fatalf("settings %+v share a cache", c)
		}
		seen[got] = true
	}
	if n := len(s.caches); n != maxSessionCaches {
		t.Fatalf("%d caches kept, want %d", n, maxSessionCaches)
	}
	if s.cache(base) == first {
		t.Fatal("the least recently used cache was kept")
	}
}
