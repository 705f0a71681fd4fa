package quiclb

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/stabilize-lb/caddy-stabilize/internal/quicwire"
)

func TestGeneratorNonces(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"plaintext random", Config{ID: 4, ServerIDLen: 2, NonceLen: 8}},
		{"keyed counter", Config{ID: 4, ServerIDLen: 2, NonceLen: 8, Key: make([]byte, KeyLen)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := NewGenerator(tc.cfg, []byte{0xbe, 0xef})
			if err != nil {
				t.Fatal(err)
			}
			d, err := NewDecoder(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if g.ConnectionIDLen() != 11 {
				t.Errorf("ConnectionIDLen %d, want 11", g.ConnectionIDLen())
			}
			seen := make(map[quic.ConnectionID]bool)
			for range 1000 {
				cid, err := g.GenerateConnectionID()
				if err != nil {
					t.Fatal(err)
				}
				if cid.Len() != g.ConnectionIDLen() || cid.Bytes()[0] != 4<<5|10 {
					t.Fatalf("CID %v: want %d octets, first octet %#x", cid, g.ConnectionIDLen(), 4<<5|10)
				}
				if seen[cid] {
					t.Fatalf("CID %v issued twice", cid)
				}
				seen[cid] = true
				if sid, err := d.Decode(cid.Bytes()); err != nil || sid.String() != "beef" {
					t.Fatalf("CID %v decodes to %v, %v", cid, sid, err)
				}
			}
		})
	}
}

func TestGeneratorNonceExhaustion(t *testing.T) {
	g, err := NewGenerator(Config{ServerIDLen: 1, NonceLen: 4, Key: make([]byte, KeyLen)}, []byte{1})
	if err != nil {
		t.Fatal(err)
	}
	// Put the counter two nonces before its start.
	g.start = [MaxNonceLen]byte{0, 0, 1, 1}
	g.next = [MaxNonceLen]byte{0, 0, 0, 0xff}
	for i := range 2 {
		if _, err := g.GenerateConnectionID(); err != nil {
			t.Fatalf("nonce %d: %v", i, err)
		}
	}
	if _, err := g.GenerateConnectionID(); !errors.Is(err, ErrNonceExhausted) {
		t.Fatalf("got %v, want ErrNonceExhausted", err)
	}
}

func TestNewGeneratorErrors(t *testing.T) {
	if _, err := NewGenerator(Config{ServerIDLen: 2, NonceLen: 4}, []byte{1}); err == nil {
		t.Error("server ID of the wrong length: no error")
	}
	if _, err := NewGenerator(Config{ID: 7, ServerIDLen: 1, NonceLen: 4}, []byte{1}); err == nil {
		t.Error("config ID 7: no error")
	}
}

func TestIncrement(t *testing.T) {
	for in, want := range map[string]string{"0000": "0001", "00ff": "0100", "ffff": "0000", "12fe": "12ff"} {
		b := unhex(t, in)
		increment(b)
		if got := string(hexBytes(b)); got != want {
			t.Errorf("increment(%s) = %s, want %s", in, got, want)
		}
	}
}

func hexBytes(b []byte) []byte {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&0xf])
	}
	return out
}

// TestGeneratorQuicGo runs a quic-go server with a Generator and a client
// that migrates to a second socket. Every packet the client sends after its
// first flight, and the SCID of every long header the server sends, must
// carry a CID that decodes to the server's ID. The migration makes the
// client use a CID the server issued in a NEW_CONNECTION_ID frame.
func TestGeneratorQuicGo(t *testing.T) {
	cfg := Config{ID: 2, ServerIDLen: 3, NonceLen: 6, Key: []byte("quic-lb test key")}
	serverID := []byte{0x0a, 0x0b, 0x0c}
	gen, err := NewGenerator(cfg, serverID)
	if err != nil {
		t.Fatal(err)
	}
	dec, err := NewDecoder(cfg)
	if err != nil {
		t.Fatal(err)
	}

	udp := listenUDP(t)
	rec := &recordingConn{PacketConn: udp}
	tr := &quic.Transport{Conn: rec, ConnectionIDGenerator: gen}
	defer tr.Close()
	ln, err := tr.Listen(serverTLS(t), &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	go echo(ln)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	clientTr := &quic.Transport{Conn: listenUDP(t)}
	defer clientTr.Close()
	tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"quiclb-test"}}
	conn, err := clientTr.Dial(ctx, udp.LocalAddr(), tlsConf, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	roundTrip(t, ctx, conn, "before migration")

	newTr := &quic.Transport{Conn: listenUDP(t)}
	defer newTr.Close()
	path, err := conn.AddPath(newTr)
	if err != nil {
		t.Fatal(err)
	}
	if err := path.Probe(ctx); err != nil {
		t.Fatal(err)
	}
	if err := path.Switch(); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, ctx, conn, "after migration")

	rec.mu.Lock()
	defer rec.mu.Unlock()
	first, err := quicwire.Parse(rec.in[0], 0)
	if err != nil {
		t.Fatal(err)
	}
	dcids := make(map[string]bool)
	for _, p := range rec.in {
		h, err := quicwire.Parse(p, gen.ConnectionIDLen())
		if err != nil {
			t.Fatalf("client packet %x: %v", p, err)
		}
		if bytes.Equal(h.DCID, first.DCID) { // the client's own choice
			continue
		}
		dcids[string(h.DCID)] = true
		if sid, err := dec.Decode(h.DCID); err != nil || !bytes.Equal(sid.Bytes(), serverID) {
			t.Errorf("client packet DCID %x decodes to %v, %v", h.DCID, sid, err)
		}
	}
	if len(dcids) < 2 {
		t.Errorf("client used %d server CIDs, want at least 2 (one per path)", len(dcids))
	}
	var scids int
	for _, p := range rec.out {
		if !quicwire.IsLongHeader(p) {
			continue
		}
		h, err := quicwire.ParseLong(p)
		if err != nil {
			t.Fatalf("server packet %x: %v", p, err)
		}
		scids++
		if sid, err := dec.Decode(h.SCID); err != nil || !bytes.Equal(sid.Bytes(), serverID) {
			t.Errorf("server packet SCID %x decodes to %v, %v", h.SCID, sid, err)
		}
	}
	if scids == 0 {
		t.Error("server sent no long header packets")
	}
}

// recordingConn records the datagrams a quic-go server reads and writes.
// Embedding the interface, not *net.UDPConn, keeps quic-go on ReadFrom and
// WriteTo.
type recordingConn struct {
	net.PacketConn
	mu      sync.Mutex
	in, out [][]byte
}

func (c *recordingConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, addr, err := c.PacketConn.ReadFrom(b)
	if err == nil {
		c.mu.Lock()
		c.in = append(c.in, bytes.Clone(b[:n]))
		c.mu.Unlock()
	}
	return n, addr, err
}

func (c *recordingConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	c.mu.Lock()
	c.out = append(c.out, bytes.Clone(b))
	c.mu.Unlock()
	return c.PacketConn.WriteTo(b, addr)
}

// SetReadBuffer and SetWriteBuffer silence quic-go's buffer size warnings.
func (c *recordingConn) SetReadBuffer(int) error  { return nil }
func (c *recordingConn) SetWriteBuffer(int) error { return nil }

func listenUDP(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// echo echoes the streams of every connection ln accepts.
func echo(ln *quic.Listener) {
	for {
		conn, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		go func() {
			for {
				s, err := conn.AcceptStream(context.Background())
				if err != nil {
					return
				}
				go func() {
					_, _ = io.Copy(s, s)
					s.Close()
				}()
			}
		}()
	}
}

func roundTrip(t *testing.T, ctx context.Context, conn *quic.Conn, msg string) {
	t.Helper()
	s, err := conn.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	s.Close()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != msg {
		t.Fatalf("echo: got %q, %v; want %q", got, err, msg)
	}
}

// serverTLS returns a TLS config with a fresh self-signed certificate.
func serverTLS(t *testing.T) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		NextProtos:   []string{"quiclb-test"},
	}
}
