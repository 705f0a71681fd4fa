package stabilize

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// testALPN is the application protocol of the test backends.
const testALPN = "stabilize-test"

// testPKI is a CA and a certificate it signed for localhost and 127.0.0.1,
// in files.
type testPKI struct {
	caFile, certFile, keyFile string
	pool                      *x509.CertPool
	cert                      tls.Certificate
}

var (
	pkiOnce sync.Once
	pki     *testPKI
	pkiErr  error
)

// newTestPKI returns the package's test PKI, made once.
func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	pkiOnce.Do(func() { pki, pkiErr = makeTestPKI() })
	if pkiErr != nil {
		t.Fatal(pkiErr)
	}
	return pki
}

func makeTestPKI() (*testPKI, error) {
	dir, err := os.MkdirTemp("", "stabilize-pki")
	if err != nil {
		return nil, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "stabilize test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	p := &testPKI{
		caFile:   filepath.Join(dir, "ca.pem"),
		certFile: filepath.Join(dir, "cert.pem"),
		keyFile:  filepath.Join(dir, "key.pem"),
		pool:     x509.NewCertPool(),
	}
	p.pool.AddCert(ca)
	writes := map[string][]byte{
		p.caFile:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		p.certFile: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		p.keyFile:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
	}
	for f, b := range writes {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			return nil, err
		}
	}
	p.cert, err = tls.LoadX509KeyPair(p.certFile, p.keyFile)
	return p, err
}

// quicBackend is a QUIC server on 127.0.0.1: it answers each bidirectional
// stream with "<name>|<the stream's data>" and FIN, each unidirectional
// stream with a unidirectional stream carrying the same, and each datagram
// with a datagram carrying the same.
type quicBackend struct {
	name  string
	addr  netip.AddrPort
	ln    *quic.Listener
	tr    *quic.Transport
	conns atomic.Int64 // connections accepted
	live  atomic.Int64

	mu      sync.Mutex
	resumed []bool                 // each connection's TLS DidResume, in accept order
	resets  []quic.StreamErrorCode // RESET_STREAM codes received
	stops   []quic.StreamErrorCode // STOP_SENDING codes received
	acks    []string               // replies to streams the backend opened
	closes  []string               // close errors of ended connections
}

func startQUICBackend(t testing.TB, name string, alpn ...string) *quicBackend {
	t.Helper()
	if len(alpn) == 0 {
		alpn = []string{testALPN}
	}
	p := newTestPKI(t)
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: conn}
	ln, err := tr.Listen(&tls.Config{Certificates: []tls.Certificate{p.cert}, NextProtos: alpn},
		&quic.Config{EnableDatagrams: true, MaxIdleTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	b := &quicBackend{name: name, addr: conn.LocalAddr().(*net.UDPAddr).AddrPort(), ln: ln, tr: tr}
	go b.serve()
	t.Cleanup(b.stop)
	return b
}

func (b *quicBackend) dial() string { return "quic/" + b.addr.String() }

// startQUICRelay starts backend "a", a balancer on network that terminates
// QUIC and relays to it, and a client connection through the balancer.
func startQUICRelay(t testing.TB, network string) (*quicBackend, *balancer, *quic.Conn) {
	t.Helper()
	b := startQUICBackend(t, "a")
	lb := startBalancerOn(t, network, false, 30*time.Second, quicHandler(t, "", "", nil, b.dial()))
	return b, lb, dialQUIC(t, lb.addr, nil, quicClientTLS(t))
}

// stop closes the server and its connections, without an application
// close.
func (b *quicBackend) stop() {
	_ = b.ln.Close()
	_ = b.tr.Close()
	_ = b.tr.Conn.Close()
}

func (b *quicBackend) serve() {
	for {
		c, err := b.ln.Accept(context.Background())
		if err != nil {
			return
		}
		b.conns.Add(1)
		b.live.Add(1)
		b.mu.Lock()
		b.resumed = append(b.resumed, c.ConnectionState().TLS.DidResume)
		b.mu.Unlock()
		go b.serveConn(c)
	}
}

func (b *quicBackend) serveConn(c *quic.Conn) {
	defer b.live.Add(-1)
	ctx := c.Context()
	go func() {
		for {
			s, err := c.AcceptUniStream(ctx)
			if err != nil {
				return
			}
			go func() {
				data, err := io.ReadAll(s)
				if err != nil {
					b.noteReset(err)
					return
				}
				if string(data) == "open bidi" {
					b.openBidi(c)
					return
				}
				out, err := c.OpenUniStreamSync(ctx)
				if err != nil {
					return
				}
				_, _ = out.Write(b.reply(data))
				_ = out.Close()
			}()
		}
	}()
	go func() {
		for {
			d, err := c.ReceiveDatagram(ctx)
			if err != nil {
				return
			}
			_ = c.SendDatagram(b.reply(d))
		}
	}()
	for {
		s, err := c.AcceptStream(ctx)
		if err != nil {
			b.mu.Lock()
			b.closes = append(b.closes, err.Error())
			b.mu.Unlock()
			return
		}
		go func() {
			data, err := io.ReadAll(s)
			if err != nil {
				b.noteReset(err)
				s.CancelWrite(7)
				return
			}
			switch string(data) {
			case "flood":
				b.flood(s)
				return
			case "die":
				_ = c.CloseWithError(0x99, "backend says bye")
				return
			case "wait stop":
				// A backend that does not write until it has to: it
				// watches its stream's send side, as quic-go suggests.
				<-s.Context().Done()
				var se *quic.StreamError
				if errors.As(context.Cause(s.Context()), &se) && se.Remote {
					b.mu.Lock()
					b.stops = append(b.stops, se.ErrorCode)
					b.mu.Unlock()
				}
				return
			case "stream id":
				_, _ = fmt.Fprint(s, int64(s.StreamID()))
				_ = s.Close()
				return
			}
			_, _ = s.Write(b.reply(data))
			_ = s.Close()
		}()
	}
}

// openBidi opens a bidirectional stream to the client, sends the
// backend's name and records the client's reply.
func (b *quicBackend) openBidi(c *quic.Conn) {
	s, err := c.OpenStreamSync(c.Context())
	if err != nil {
		return
	}
	_, _ = s.Write(b.reply([]byte("server bidi")))
	_ = s.Close()
	ack, _ := io.ReadAll(s)
	b.mu.Lock()
	b.acks = append(b.acks, string(ack))
	b.mu.Unlock()
}

// flood writes to s until the client stops it, and records the code.
func (b *quicBackend) flood(s *quic.Stream) {
	chunk := make([]byte, 1024)
	for {
		if _, err := s.Write(chunk); err != nil {
			var se *quic.StreamError
			if errors.As(err, &se) {
				b.mu.Lock()
				b.stops = append(b.stops, se.ErrorCode)
				b.mu.Unlock()
			}
			return
		}
	}
}

// snapshot returns copies of the recorded events.
func (b *quicBackend) snapshot() (resets, stops []quic.StreamErrorCode, acks, closes []string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.resets), slices.Clone(b.stops), slices.Clone(b.acks), slices.Clone(b.closes)
}

func (b *quicBackend) reply(data []byte) []byte {
	return append([]byte(b.name+"|"), data...)
}

func (b *quicBackend) noteReset(err error) {
	var se *quic.StreamError
	if errors.As(err, &se) {
		b.mu.Lock()
		b.resets = append(b.resets, se.ErrorCode)
		b.mu.Unlock()
	}
}

// quicHandler is a stabilize handler config terminating QUIC with the test
// certificate and relaying to the backends, trusting the test CA.
func quicHandler(t testing.TB, per, policy string, quicExtra map[string]any, ups ...string) map[string]any {
	p := newTestPKI(t)
	var list []any
	for _, u := range ups {
		list = append(list, map[string]any{"dial": u})
	}
	q := map[string]any{
		"certificate": p.certFile,
		"key":         p.keyFile,
		"alpn":        []string{testALPN},
	}
	if len(ups) > 0 && len(ups[0]) > 5 && ups[0][:5] == "quic/" {
		q["tls_trust_pool"] = map[string]any{"provider": "file", "pem_files": []string{p.caFile}}
	}
	for k, v := range quicExtra {
		q[k] = v
	}
	h := map[string]any{"handler": "stabilize", "upstreams": list, "quic": q}
	if per != "" {
		h["per"] = per
	}
	if policy != "" {
		h["load_balancing"] = map[string]any{"selection": map[string]any{"policy": policy}}
	}
	return h
}

// quicClientTLS is the TLS config of a test client of the balancer.
func quicClientTLS(t testing.TB, alpn ...string) *tls.Config {
	if len(alpn) == 0 {
		alpn = []string{testALPN}
	}
	return &tls.Config{RootCAs: newTestPKI(t).pool, ServerName: "localhost", NextProtos: alpn}
}

// dialQUIC connects a client to addr, from a socket of its own.
func dialQUIC(t testing.TB, addr string, conf *quic.Config, tlsConf *tls.Config) *quic.Conn {
	t.Helper()
	c, err := dialQUICErr(addr, conf, tlsConf)
	if err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = c.CloseWithError(0, "") })
	return c
}

func dialQUICErr(addr string, conf *quic.Config, tlsConf *tls.Config) (*quic.Conn, error) {
	if conf == nil {
		conf = &quic.Config{EnableDatagrams: true}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return quic.DialAddr(ctx, addr, tlsConf, conf)
}

// quicExchange sends data on a new bidirectional stream with FIN and returns
// the reply read to FIN.
func quicExchange(c *quic.Conn, data []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := c.OpenStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	_ = s.SetDeadline(time.Now().Add(10 * time.Second))
	errc := make(chan error, 1)
	go func() {
		_, err := s.Write(data)
		if err == nil {
			err = s.Close()
		}
		errc <- err
	}()
	reply, err := io.ReadAll(s)
	if werr := <-errc; err == nil {
		err = werr
	}
	return reply, err
}

// mustExchange is quicExchange that fails the test unless the reply is
// "<backend>|data", and returns the backend's name.
func mustExchange(t testing.TB, c *quic.Conn, data []byte) string {
	t.Helper()
	reply, err := quicExchange(c, data)
	if err != nil {
		t.Fatalf("exchange of %d bytes: %v", len(data), err)
	}
	name, echo, ok := bytes.Cut(reply, []byte("|"))
	if !ok || !bytes.Equal(echo, data) {
		t.Fatalf("exchange of %d bytes: reply of %d bytes does not echo it", len(data), len(reply))
	}
	return string(name)
}

// datagramExchange sends msg in a DATAGRAM frame, retrying a few times,
// and returns the reply frame's data.
func datagramExchange(t *testing.T, c *quic.Conn, msg string) string {
	t.Helper()
	for range 5 {
		if err := c.SendDatagram([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		d, err := c.ReceiveDatagram(ctx)
		cancel()
		if err == nil {
			return string(d)
		}
	}
	return ""
}

// waitClosedWith fails the test unless c closes within the time, with
// the application error code.
func waitClosedWith(t *testing.T, c *quic.Conn, within time.Duration, code quic.ApplicationErrorCode) {
	t.Helper()
	select {
	case <-c.Context().Done():
	case <-time.After(within):
		t.Fatalf("the connection is still open after %v, want a close with code %#x", within, code)
	}
	var ae *quic.ApplicationError
	if !errors.As(context.Cause(c.Context()), &ae) || ae.ErrorCode != code {
		t.Fatalf("closed with %v, want code %#x", context.Cause(c.Context()), code)
	}
}
