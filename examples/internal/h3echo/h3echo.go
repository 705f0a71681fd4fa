// Package h3echo runs HTTP/3 servers that name themselves in every reply,
// optionally issuing QUIC-LB connection IDs, to stand as the upstreams of a
// `per connection` load balancer.
package h3echo

import (
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/stabilize-lb/caddy-stabilize/examples/internal/quicecho"
	"github.com/stabilize-lb/caddy-stabilize/stabilize/quiclb"
)

// Server is one HTTP/3 server. Its reply to every request is its listen
// address.
type Server struct {
	addr     *net.UDPAddr
	serverID []byte
	tr       *quic.Transport
	srv      *http3.Server
	requests atomic.Uint64
}

// Start starts a server on addr. With cfg, it issues QUIC-LB connection
// IDs for serverID, which must be cfg.ServerIDLen octets.
func Start(addr string, cfg *quiclb.Config, serverID []byte) (*Server, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	conn, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, err
	}
	s := &Server{addr: conn.LocalAddr().(*net.UDPAddr), tr: &quic.Transport{Conn: conn}}
	if cfg != nil {
		gen, err := quiclb.NewGenerator(*cfg, serverID)
		if err != nil {
			_ = conn.Close()
			return nil, err
		}
		s.tr.ConnectionIDGenerator = gen
		s.serverID = serverID
	}
	tlsConf, err := selfSigned()
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	ln, err := s.tr.ListenEarly(http3.ConfigureTLSConfig(tlsConf), &quic.Config{})
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	s.srv = &http3.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		s.requests.Add(1)
		_, _ = io.WriteString(w, s.Name())
	})}
	go func() { _ = s.srv.ServeListener(ln) }()
	return s, nil
}

// Name is the server's listen address, its reply to every request.
func (s *Server) Name() string { return s.addr.String() }

// ServerID is the server's QUIC-LB server ID in hexadecimal, or "".
func (s *Server) ServerID() string { return hex.EncodeToString(s.serverID) }

// Requests is how many requests the server answered.
func (s *Server) Requests() uint64 { return s.requests.Load() }

// Close stops the server.
func (s *Server) Close() error {
	_ = s.srv.Close()
	return s.tr.Close()
}

// ParseQUICLB parses a QUIC-LB configuration written as the balancer's
// quic_lb block, comma-separated: config_id=<0-6>,server_id_length=<n>,
// nonce_length=<n>[,key=<32 hex digits>].
func ParseQUICLB(s string) (quiclb.Config, error) {
	var cfg quiclb.Config
	for field := range strings.SplitSeq(s, ",") {
		name, value, _ := strings.Cut(strings.TrimSpace(field), "=")
		var err error
		switch name {
		case "config_id":
			var n int
			n, err = strconv.Atoi(value)
			cfg.ID = uint8(n)
			if n < 0 || n > quiclb.MaxConfigID {
				err = fmt.Errorf("must be 0 to %d", quiclb.MaxConfigID)
			}
		case "server_id_length":
			cfg.ServerIDLen, err = strconv.Atoi(value)
		case "nonce_length":
			cfg.NonceLen, err = strconv.Atoi(value)
		case "key":
			cfg.Key, err = hex.DecodeString(value)
		default:
			return cfg, fmt.Errorf("quic-lb %q: unknown field %q", s, name)
		}
		if err != nil {
			return cfg, fmt.Errorf("quic-lb %q: %s %q: %w", s, name, value, err)
		}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, fmt.Errorf("quic-lb %q: %w", s, err)
	}
	return cfg, nil
}

// ServerIDFor returns server number i's ID (from 0): i+1 in n octets,
// big-endian.
func ServerIDFor(i, n int) []byte {
	id := make([]byte, n)
	v := i + 1
	for j := n - 1; j >= 0; j-- {
		id[j] = byte(v)
		v >>= 8
	}
	return id
}

// selfSigned returns a TLS config with the example servers' self-signed
// certificate for localhost and 127.0.0.1 (quicecho.SelfSigned): clients
// trust its file or skip verification (curl -k).
func selfSigned() (*tls.Config, error) {
	_, _, cert, err := quicecho.SelfSigned()
	if err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}}, nil
}
