package h3echo

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

func TestParseQUICLB(t *testing.T) {
	cfg, err := ParseQUICLB("config_id=1,server_id_length=2,nonce_length=6,key=000102030405060708090a0b0c0d0e0f")
	if err != nil || cfg.ID != 1 || cfg.ServerIDLen != 2 || cfg.NonceLen != 6 || len(cfg.Key) != 16 {
		t.Fatalf("got %+v, %v", cfg, err)
	}
	for _, bad := range []string{"config_id=7,server_id_length=2,nonce_length=6", "server_id_length=2,nonce_length=3", "server_id_length=2,nonce_length=6,key=zz", "size=3"} {
		if _, err := ParseQUICLB(bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
	if got := ServerIDFor(257, 2); got[0] != 1 || got[1] != 2 {
		t.Errorf("ServerIDFor(257, 2) = %x", got)
	}
}

// TestServerQUICLB requests a page from a QUIC-LB server and checks that
// the connection ID the client sends to decodes to the server's ID.
func TestServerQUICLB(t *testing.T) {
	cfg, err := ParseQUICLB("config_id=2,server_id_length=2,nonce_length=6")
	if err != nil {
		t.Fatal(err)
	}
	s, err := Start("127.0.0.1:0", &cfg, ServerIDFor(4, 2))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recordingConn{PacketConn: pc}
	tr := &quic.Transport{Conn: rec}
	defer tr.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	conn, err := tr.Dial(ctx, s.addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{http3.NextProtoH3}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	// Several requests: the first may travel in a datagram that starts
	// with a coalesced Handshake packet.
	cc := (&http3.Transport{}).NewClientConn(conn)
	for i := range 3 {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://127.0.0.1/", nil)
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != s.Name() || s.Requests() != uint64(i+1) {
			t.Errorf("reply %q, %d requests; want %q, %d", body, s.Requests(), s.Name(), i+1)
		}
	}
	d, err := quiclb.NewDecoder(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	short := 0
	for _, p := range rec.sent {
		if p[0]&0x80 != 0 {
			continue
		}
		short++
		sid, err := d.Decode(p[1 : 1+cfg.CIDLen()])
		if err != nil || sid.String() != s.ServerID() {
			t.Errorf("short header DCID %x decodes to %v, %v; want %s", p[1:1+cfg.CIDLen()], sid, err, s.ServerID())
		}
	}
	if short == 0 {
		t.Error("the client sent no short header packet")
	}
}

// recordingConn records the datagrams the client sends. Embedding the
// interface keeps quic-go on WriteTo.
type recordingConn struct {
	net.PacketConn
	mu   sync.Mutex
	sent [][]byte
}

func (c *recordingConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	c.mu.Lock()
	c.sent = append(c.sent, bytes.Clone(b))
	c.mu.Unlock()
	return c.PacketConn.WriteTo(b, addr)
}

// SetReadBuffer and SetWriteBuffer silence quic-go's buffer size warnings.
func (c *recordingConn) SetReadBuffer(int) error  { return nil }
func (c *recordingConn) SetWriteBuffer(int) error { return nil }
