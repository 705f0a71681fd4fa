package stabilize

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/qlog"
	"github.com/quic-go/quic-go/qlogwriter"
)

// startH3Backend starts an HTTP/3 server on 127.0.0.1 that answers GET
// with its name and POST with the body's length and SHA-256.
func startH3Backend(t *testing.T, name string) string {
	t.Helper()
	p := newTestPKI(t)
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, name+"|hello "+r.Proto)
	})
	mux.HandleFunc("POST /upload", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		_, _ = io.WriteString(w, name+"|"+hex.EncodeToString(h.Sum(nil))+"|"+itoa(n))
	})
	srv := &http3.Server{Handler: mux, TLSConfig: http3.ConfigureTLSConfig(&tls.Config{Certificates: []tls.Certificate{p.cert}})}
	go func() { _ = srv.Serve(conn) }()
	t.Cleanup(func() {
		_ = srv.Close()
		_ = conn.Close()
	})
	return "quic/" + conn.LocalAddr().String()
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// TestQUICHTTP3 sends a GET and a 1 MiB POST from an HTTP/3 client through
// stabilize to an HTTP/3 server.
func TestQUICHTTP3(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		backend := startH3Backend(t, "a")
		h := quicHandler(t, "", "", nil, backend)
		delete(h["quic"].(map[string]any), "alpn") // the default: h3
		lb := startBalancerOn(t, network, false, 30*time.Second, h)
		tr := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: newTestPKI(t).pool, ServerName: "localhost"}}
		defer tr.Close()
		client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
		resp, err := client.Get("https://" + lb.addr + "/hello")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "a|hello HTTP/3.0" {
			t.Fatalf("GET: %q", body)
		}
		data := make([]byte, 1<<20)
		_, _ = rand.Read(data)
		sum := sha256.Sum256(data)
		resp, err = client.Post("https://"+lb.addr+"/upload", "application/octet-stream", bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := "a|" + hex.EncodeToString(sum[:]) + "|1048576"; string(body) != want {
			t.Fatalf("POST: %q, want %q", body, want)
		}
	})
}

// retryCounter is a client qlog trace that counts Retry packets received.
type retryCounter struct{ n atomic.Int64 }

func (r *retryCounter) AddProducer() qlogwriter.Recorder { return retryRecorder{r} }
func (r *retryCounter) SupportsSchemas(string) bool      { return true }

type retryRecorder struct{ r *retryCounter }

func (rr retryRecorder) RecordEvent(ev qlogwriter.Event) {
	if p, ok := ev.(qlog.PacketReceived); ok && p.Header.PacketType == qlog.PacketTypeRetry {
		rr.r.n.Add(1)
	}
}
func (retryRecorder) Close() error { return nil }

// TestQUICStatelessRetry: with stateless_retry the client's tracer records
// a Retry packet and the connection works; without it, none.
func TestQUICStatelessRetry(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		for _, retry := range []bool{true, false} {
			t.Run(map[bool]string{true: "on", false: "off"}[retry], func(t *testing.T) {
				tr := trackHandlers(t)
				b := startQUICBackend(t, "a")
				extra := map[string]any{}
				if retry {
					extra["stateless_retry"] = true
				}
				lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", extra, b.dial()))
				rc := new(retryCounter)
				conf := &quic.Config{Tracer: func(context.Context, bool, quic.ConnectionID) qlogwriter.Trace { return rc }}
				c := dialQUIC(t, lb.addr, conf, quicClientTLS(t))
				mustExchange(t, c, []byte("hi"))
				want := int64(0)
				if retry {
					want = 1
				}
				if got := rc.n.Load(); got != want {
					t.Fatalf("Retry packets seen by the client: %d, want %d", got, want)
				}
				// A ClientHello in two Initial packets draws two Retries.
				if got := tr.latest().QUIC.stats.retries.Load(); (got > 0) != retry {
					t.Fatalf("Retries counted: %d, with the option %t", got, retry)
				}
			})
		}
	})
}

// lineWriter collects what is written to it.
type lineWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(b)
}

func (w *lineWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// TestQUICKeyLog: the key log file's lines equal the lines the client's
// own KeyLogWriter recorded; without the option there is no file.
func TestQUICKeyLog(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		for _, on := range []bool{true, false} {
			t.Run(map[bool]string{true: "on", false: "off"}[on], func(t *testing.T) {
				b := startQUICBackend(t, "a")
				file := filepath.Join(t.TempDir(), "keys.log")
				extra := map[string]any{}
				if on {
					extra["keylog"] = file
				}
				lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", extra, b.dial()))
				var client lineWriter
				tlsConf := quicClientTLS(t)
				tlsConf.KeyLogWriter = &client
				c := dialQUIC(t, lb.addr, nil, tlsConf)
				mustExchange(t, c, []byte("hi"))
				got, err := os.ReadFile(file)
				if !on {
					if !os.IsNotExist(err) {
						t.Fatalf("a key log without the option: %v", err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				want := client.String()
				if strings.Count(want, "\n") < 4 || string(got) != want {
					t.Fatalf("key log:\n%s\nthe client's:\n%s", got, want)
				}
			})
		}
	})
}

// TestCommandQUIC runs the original's command line: `caddy stabilize
// --listen --cert --key --to quic/... --keylog --stateless-retry`, and
// checks the help text shows the original's flags.
func TestCommandQUIC(t *testing.T) {
	c := caddycmd.Commands()["stabilize"]
	for _, want := range []string{"-c, --cert <cert>", "--stateless-retry", "--keylog <file>", "--internal-certs", "--insecure"} {
		if !strings.Contains(c.Long, want) {
			t.Errorf("help text lacks %q", want)
		}
	}
	p := newTestPKI(t)
	a, b := startQUICBackend(t, "a"), startQUICBackend(t, "b")
	listen := freeUDPAddr(t)
	keylog := filepath.Join(t.TempDir(), "keys.log")
	opts := parseCommandArgs(t,
		"--listen", listen,
		"--cert", p.certFile, "-k", p.keyFile,
		"--to", a.dial(), "--to", b.dial(),
		"--alpn", testALPN,
		"--keylog", keylog,
		"--stateless-retry",
		"--insecure",
		"--admin", "off")
	if err := startCommand(opts); err != nil {
		t.Fatalf("starting: %v", err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	got := map[string]int{}
	rc := new(retryCounter)
	conf := &quic.Config{Tracer: func(context.Context, bool, quic.ConnectionID) qlogwriter.Trace { return rc }}
	for range 4 {
		c := dialQUIC(t, listen, conf, quicClientTLS(t))
		got[mustExchange(t, c, []byte("Hello, world!"))]++
	}
	if got["a"] != 2 || got["b"] != 2 {
		t.Errorf("connections per backend: %v, want 2 each", got)
	}
	if rc.n.Load() != 4 {
		t.Errorf("Retries seen: %d, want one per connection", rc.n.Load())
	}
	if st, err := os.Stat(keylog); err != nil || st.Size() == 0 {
		t.Errorf("key log: %v", err)
	}

	for _, bad := range [][]string{
		{"--listen", ":4433", "--to", "quic/127.0.0.1:1"},
		{"--listen", ":4433", "--to", "quic/127.0.0.1:1", "--cert", "a.pem", "--key", "a.key", "--domain", "example.com"},
	} {
		if _, err := buildCommandConfig(parseCommandArgs(t, bad...)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
	raw, err := buildCommandConfig(parseCommandArgs(t, "--listen", ":4433", "--to", "quic/127.0.0.1:1", "--domain", "localhost"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), `"automate":["localhost"]`) || !strings.Contains(string(raw), `"module":"internal"`) {
		t.Errorf("--domain localhost: %s, want the internal issuer to manage it", raw)
	}
}

// TestQUICMetricsAndAdmin: /stabilize/upstreams shows each upstream's live
// QUIC connections, and /metrics counts connections, failures, streams and
// bytes.
func TestQUICMetricsAndAdmin(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		a, b := startQUICBackend(t, "a"), startQUICBackend(t, "b")
		lb := startBalancerOn(t, network, true, 30*time.Second, quicHandler(t, "", "least_sessions", nil, a.dial(), b.dial()))
		var conns []*quic.Conn
		for range 4 {
			c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
			mustExchange(t, c, []byte("12345"))
			conns = append(conns, c)
		}
		st, _ := getUpstreams(t, lb.admin)
		for _, be := range []*quicBackend{a, b} {
			if s := statusOf(t, st, be.addr); s.QUICConnections != 2 || s.QUICStreams != 1*2 {
				t.Errorf("%s: quic_connections %d, quic_streams %d, want 2 and 2 (least_sessions)", be.name, s.QUICConnections, s.QUICStreams)
			}
		}
		_, _ = dialQUICErr(lb.addr, nil, quicClientTLS(t, "wrong"))
		m := scrape(t, lb.admin)
		if got := m.get(t, "caddy_stabilize_quic_connections_accepted_total", "handler", "0"); got != 4 {
			t.Errorf("accepted: %v, want 4", got)
		}
		if got := m.get(t, "caddy_stabilize_quic_connections_active", "handler", "0"); got != 4 {
			t.Errorf("active: %v, want 4", got)
		}
		if got := m.get(t, "caddy_stabilize_quic_connections_failed_total", "handler", "0", "reason", "alpn"); got != 1 {
			t.Errorf("failed by alpn: %v, want 1", got)
		}
		if got := m.get(t, "caddy_stabilize_upstream_quic_stream_bytes_total", "upstream", a.addr.String(), "direction", "to_upstream"); got != 10 {
			t.Errorf("bytes to a: %v, want 10", got)
		}
		if got := m.get(t, "caddy_stabilize_upstream_quic_stream_bytes_total", "upstream", a.addr.String(), "direction", "from_upstream"); got != 14 {
			t.Errorf("bytes from a: %v, want 14", got)
		}
		for _, c := range conns {
			_ = c.CloseWithError(0, "")
		}
		eventually(t, 5*time.Second, "no live QUIC connections", func() bool {
			st, _ := getUpstreams(t, lb.admin)
			return statusOf(t, st, a.addr).QUICConnections == 0 && statusOf(t, st, b.addr).QUICConnections == 0
		})
	})
}

// TestQUIC0RTT: a resuming client's 0-RTT data is accepted with allow_0rtt,
// counted, and relayed; without it the client falls back to 1-RTT. With a
// certificate pair, a ticket from before a reload still resumes after it.
func TestQUIC0RTT(t *testing.T) {
	forNetworks(t, func(t *testing.T, network string) {
		for _, tc := range []struct {
			name          string
			allow, reload bool
		}{{"on", true, false}, {"off", false, false}, {"on after a reload", true, true}} {
			t.Run(tc.name, func(t *testing.T) {
				allow := tc.allow
				tr := trackHandlers(t)
				b := startQUICBackend(t, "a")
				extra := map[string]any{}
				if allow {
					extra["allow_0rtt"] = true
				}
				lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", extra, b.dial()))
				tlsConf := quicClientTLS(t)
				tlsConf.ClientSessionCache = tls.NewLRUClientSessionCache(4)
				c := dialQUIC(t, lb.addr, nil, tlsConf)
				mustExchange(t, c, []byte("first"))
				time.Sleep(100 * time.Millisecond) // the session ticket
				_ = c.CloseWithError(0, "")
				if tc.reload {
					extra["max_idle_timeout"] = "20s" // a new config, new handler
					cfg := testConfigOn(network, lb.addr, "", 30*time.Second, quicHandler(t, "", "", extra, b.dial()))
					if err := caddy.Load(cfg, true); err != nil {
						t.Fatal(err)
					}
				}

				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				c, err := quic.DialAddrEarly(ctx, lb.addr, tlsConf, &quic.Config{EnableDatagrams: true})
				if err != nil {
					t.Fatal(err)
				}
				defer c.CloseWithError(0, "")
				// quic-go v0.64.1 races (under -race) when a stream opens
				// while its 0-RTT client applies the server's transport
				// parameters: open it once the handshake is done. The
				// server has accepted 0-RTT (or not) by then.
				select {
				case <-c.HandshakeComplete():
				case <-ctx.Done():
					t.Fatal("handshake timed out")
				}
				if name := mustExchange(t, c, []byte("early")); name != "a" {
					t.Fatalf("reply from %q", name)
				}
				if used := c.ConnectionState().Used0RTT; used != allow {
					t.Fatalf("0-RTT used: %t, want %t", used, allow)
				}
				if !c.ConnectionState().TLS.DidResume {
					t.Fatal("the client did not resume")
				}
				want := uint64(0)
				if allow {
					want = 1
				}
				if n := tr.latest().QUIC.stats.zeroRTT.Load(); n != want {
					t.Fatalf("0-RTT counted: %d, want %d", n, want)
				}
			})
		}
	})
}

// TestQUICQlogDir writes a qlog file per connection, both legs.
func TestQUICQlogDir(t *testing.T) {
	b := startQUICBackend(t, "a")
	dir := t.TempDir()
	lb := startBalancerOn(t, FastNetwork, false, 30*time.Second, quicHandler(t, "", "", map[string]any{"qlog_dir": dir}, b.dial()))
	c := dialQUIC(t, lb.addr, nil, quicClientTLS(t))
	mustExchange(t, c, []byte("traced"))
	_ = c.CloseWithError(0, "")
	eventually(t, 5*time.Second, "a server and a client qlog", func() bool {
		server, _ := filepath.Glob(filepath.Join(dir, "*_server.sqlog"))
		client, _ := filepath.Glob(filepath.Join(dir, "*_client.sqlog"))
		return len(server) == 1 && len(client) == 1
	})
}
